//! How a drover identity is written into a certificate, and read back out of one.
//!
//! An agent's certificate names its host three ways:
//! - the URI SAN `urn:drover:host:<uuid>`: the identity a server reads off a verified peer
//!   ([`PeerIdentity`]);
//! - the DNS SAN `<uuid>.host.drover.internal` ([`agent_dns_name`]): the name a client verifies
//!   the agent's server certificate against. A client that wants host X connects to whatever
//!   address X has but checks the name of X, so one agent cannot answer in place of another
//!   (with reqwest: `ClientBuilder::resolve(agent_dns_name(x), address)`);
//! - the subject CN (the UUID), for people reading `openssl x509` output.
//!
//! The control plane's certificate carries the URI SAN `urn:drover:control-plane` plus the DNS
//! names and addresses agents reach it by. The CA writes these names itself; it never copies a
//! name from a CSR, so only the CA decides who a certificate speaks for.

use std::net::IpAddr;

use drover_types::HostId;
use rustls::pki_types::{CertificateDer, ServerName};
use uuid::Uuid;
use x509_parser::extensions::{GeneralName, ParsedExtension};

use crate::error::{PkiError, Result};

pub(crate) const HOST_URI_PREFIX: &str = "urn:drover:host:";
pub(crate) const CONTROL_PLANE_URI: &str = "urn:drover:control-plane";
const AGENT_DNS_SUFFIX: &str = ".host.drover.internal";

/// The DNS name in host `host_id`'s agent certificate: what a client verifies the agent's server
/// certificate against, whatever address it reached the agent at.
pub fn agent_dns_name(host_id: HostId) -> String {
    format!("{}{AGENT_DNS_SUFFIX}", host_id.0.as_hyphenated())
}

/// [`agent_dns_name`] as the `ServerName` a rustls client connects with.
pub fn agent_server_name(host_id: HostId) -> ServerName<'static> {
    // A hyphenated UUID followed by fixed labels is always a valid DNS name.
    ServerName::try_from(agent_dns_name(host_id)).expect("an agent DNS name is a valid server name")
}

pub(crate) fn host_uri(host_id: HostId) -> String {
    format!("{HOST_URI_PREFIX}{}", host_id.0.as_hyphenated())
}

/// A name the control plane's certificate is valid for: a DNS name or an IP address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubjectName {
    Dns(String),
    Ip(IpAddr),
}

impl std::str::FromStr for SubjectName {
    type Err = PkiError;
    /// An IP address if it parses as one, else a DNS name (checked for syntax).
    fn from_str(s: &str) -> Result<Self> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(SubjectName::Ip(ip));
        }
        match ServerName::try_from(s) {
            Ok(ServerName::DnsName(_)) => Ok(SubjectName::Dns(s.to_ascii_lowercase())),
            _ => Err(PkiError::malformed("subject name", format!("{s:?} is neither a DNS name nor an IP address"))),
        }
    }
}

impl std::fmt::Display for SubjectName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubjectName::Dns(d) => f.write_str(d),
            SubjectName::Ip(ip) => ip.fmt(f),
        }
    }
}

impl SubjectName {
    pub(crate) fn to_san(&self) -> Result<rcgen::SanType> {
        Ok(match self {
            SubjectName::Dns(d) => rcgen::SanType::DnsName(d.clone().try_into().map_err(PkiError::Certificate)?),
            SubjectName::Ip(ip) => rcgen::SanType::IpAddress(*ip),
        })
    }
}

/// Who is at the other end of a verified connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerIdentity {
    /// An enrolled agent.
    Host(HostId),
    /// The control plane.
    ControlPlane,
}

/// Who the end-entity certificate of a peer speaks for: the first of `peer_certificates` (as
/// rustls' `peer_certificates()` returns them, after verification).
///
/// This reads names only; it trusts them because the verifier already checked the certificate
/// was issued by our CA, which writes these names itself. Call it only on certificates that came
/// through a verifier built by this crate.
pub fn peer_identity(peer_certificates: &[CertificateDer<'_>]) -> Result<PeerIdentity> {
    let end_entity =
        peer_certificates.first().ok_or_else(|| PkiError::Untrusted("the peer presented no certificate".into()))?;
    certificate_identity(end_entity)
}

/// The host a verified peer is: for routes only agents may call. The control plane, or a
/// certificate that names no host, is refused (unauthorized).
pub fn peer_host_id(peer_certificates: &[CertificateDer<'_>]) -> Result<HostId> {
    match peer_identity(peer_certificates)? {
        PeerIdentity::Host(host_id) => Ok(host_id),
        PeerIdentity::ControlPlane => Err(PkiError::Untrusted("the peer is the control plane, not an agent".into())),
    }
}

/// The drover identity a certificate names (see the module doc). A certificate that names none,
/// or more than one, is refused.
pub(crate) fn certificate_identity(cert: &CertificateDer<'_>) -> Result<PeerIdentity> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| PkiError::Untrusted(format!("the certificate does not parse: {e}")))?;
    let mut found = None;
    for ext in parsed.extensions() {
        let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() else { continue };
        for name in &san.general_names {
            let GeneralName::URI(uri) = name else { continue };
            let identity = if *uri == CONTROL_PLANE_URI {
                PeerIdentity::ControlPlane
            } else if let Some(id) = uri.strip_prefix(HOST_URI_PREFIX) {
                let uuid = Uuid::parse_str(id)
                    .map_err(|_| PkiError::Untrusted(format!("the certificate names a malformed host {id:?}")))?;
                PeerIdentity::Host(HostId(uuid))
            } else {
                continue;
            };
            if found.replace(identity).is_some_and(|previous| previous != identity) {
                return Err(PkiError::Untrusted("the certificate names more than one drover identity".into()));
            }
        }
    }
    found.ok_or_else(|| PkiError::Untrusted("the certificate names no drover identity".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_names_parse_as_ip_or_dns() {
        assert_eq!("10.0.0.1".parse::<SubjectName>().unwrap(), SubjectName::Ip("10.0.0.1".parse().unwrap()));
        assert_eq!("::1".parse::<SubjectName>().unwrap(), SubjectName::Ip("::1".parse().unwrap()));
        assert_eq!("CP.Example.com".parse::<SubjectName>().unwrap(), SubjectName::Dns("cp.example.com".into()));
        assert!("not a name".parse::<SubjectName>().is_err());
        assert!("".parse::<SubjectName>().is_err());
    }

    #[test]
    fn agent_dns_name_is_fixed_by_the_host_id() {
        let id = HostId(Uuid::parse_str("6f1c1a52-3e1f-4c57-9d0e-1b2c3d4e5f60").unwrap());
        assert_eq!(agent_dns_name(id), "6f1c1a52-3e1f-4c57-9d0e-1b2c3d4e5f60.host.drover.internal");
        assert_eq!(host_uri(id), "urn:drover:host:6f1c1a52-3e1f-4c57-9d0e-1b2c3d4e5f60");
        let _ = agent_server_name(id);
    }
}
