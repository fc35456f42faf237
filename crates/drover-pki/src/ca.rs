//! The control plane's certificate authority.
//!
//! Its directory (0700) holds:
//! - `ca.key.pem` (0600): the CA's PKCS#8 key (ECDSA P-256);
//! - `ca.cert.pem`: the self-signed CA certificate, valid for [`CA_VALIDITY_DAYS`], path length
//!   0 (it signs end entities only);
//! - `control-plane.key.pem` (0600) and `control-plane.cert.pem`: the control plane's own
//!   certificate, chain included (see [`ControlPlaneCa::control_plane_identity`]).
//!
//! The key is written before the certificate, each durably: a crash between the two leaves a key
//! without a certificate, which the next start replaces; never a certificate without its key.

use std::path::{Path, PathBuf};

use drover_types::HostId;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::CertificateSigningRequestDer;
use rustls::pki_types::pem::PemObject;
use time::{Duration, OffsetDateTime};

use crate::error::{PkiError, Result};
use crate::files;
use crate::names::{self, SubjectName};
use crate::tls::{CaFingerprint, TlsIdentity, TrustedCa};

/// The largest CSR, in PEM, that [`ControlPlaneCa::sign_agent_csr`] parses.
pub const MAX_CSR_PEM: usize = 16 * 1024;
pub const CA_VALIDITY_DAYS: i64 = 10 * 365;
/// Agents' and the control plane's certificates.
pub const LEAF_VALIDITY_DAYS: i64 = 365;
/// A control-plane certificate closer than this to its end is issued again at start.
pub const RENEW_BEFORE_DAYS: i64 = 30;
/// Certificates start this long before they are issued, for clocks slightly behind ours.
const CLOCK_SKEW: Duration = Duration::minutes(5);

const CA_KEY: &str = "ca.key.pem";
const CA_CERT: &str = "ca.cert.pem";
const CONTROL_PLANE_KEY: &str = "control-plane.key.pem";
const CONTROL_PLANE_CERT: &str = "control-plane.cert.pem";

/// The control plane's CA, loaded: it signs agents' CSRs and the control plane's own certificate.
pub struct ControlPlaneCa {
    dir: PathBuf,
    key: KeyPair,
    /// The CA as rcgen's issuer: rebuilt from the stored certificate's subject, key identifier
    /// and key, so what it signs chains to the stored certificate.
    issuer: rcgen::Certificate,
    trusted: TrustedCa,
}

impl std::fmt::Debug for ControlPlaneCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlaneCa")
            .field("dir", &self.dir)
            .field("fingerprint", &self.trusted.fingerprint())
            .finish()
    }
}

/// A certificate issued to a process, with its CA (for the response to an enrolment).
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    pub certificate_pem: String,
    pub ca_pem: String,
    /// When the certificate stops being valid ([`LEAF_VALIDITY_DAYS`] after it was issued).
    pub not_after: drover_types::Timestamp,
}

/// A certificate chain and its new private key, in PEM. The key is redacted from `Debug`.
#[derive(Clone)]
pub struct IssuedIdentity {
    pub chain_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for IssuedIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedIdentity").field("chain_pem", &self.chain_pem).field("key_pem", &"<redacted>").finish()
    }
}

impl IssuedIdentity {
    /// The private key (PKCS#8 PEM): write it 0600, never log it.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }
    pub fn tls_identity(&self) -> Result<TlsIdentity> {
        TlsIdentity::from_pem(&self.chain_pem, &self.key_pem)
    }
}

impl ControlPlaneCa {
    /// Loads the CA in `dir`, or creates it (and the directory, 0700) if there is none.
    pub fn create_or_load(dir: &Path) -> Result<Self> {
        files::ensure_private_dir(dir)?;
        let (key_path, cert_path) = (dir.join(CA_KEY), dir.join(CA_CERT));
        if files::exists(&cert_path)? {
            return Self::load(dir);
        }
        let key = KeyPair::generate().map_err(PkiError::Certificate)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "drover");
        // A random suffix: two installations' CAs never share a name, so a certificate from
        // the other one is refused as "unknown issuer" rather than on its signature alone.
        dn.push(
            DnType::CommonName,
            format!("drover control-plane CA {}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + Duration::days(CA_VALIDITY_DAYS);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(PkiError::Certificate)?;
        files::write_private(&key_path, key.serialize_pem().as_bytes())?;
        files::write_public(&cert_path, cert.pem().as_bytes())?;
        tracing::info!(dir = %dir.display(), "created the control plane's CA");
        Self::load(dir)
    }

    /// Loads the CA in `dir`. Refused if the directory or the key is readable by others, or if
    /// the key is not the certificate's.
    pub fn load(dir: &Path) -> Result<Self> {
        files::ensure_private_dir(dir)?;
        let (key_path, cert_path) = (dir.join(CA_KEY), dir.join(CA_CERT));
        let key_pem = files::read_private(&key_path)?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|_| PkiError::CorruptFile { path: key_path.clone(), reason: "not a PEM private key".into() })?;
        let cert_pem = files::read_bounded(&cert_path)?;
        let corrupt = |reason: String| PkiError::CorruptFile { path: cert_path.clone(), reason };
        let trusted = TrustedCa::from_pem(&cert_pem).map_err(|e| corrupt(e.to_string()))?;
        if spki_key(trusted.der()).map_err(|e| corrupt(e.to_string()))? != key.public_key_raw() {
            return Err(corrupt(format!("its key is not the one in {CA_KEY}")));
        }
        let params = CertificateParams::from_ca_cert_der(trusted.der()).map_err(|e| corrupt(e.to_string()))?;
        let issuer = params.self_signed(&key).map_err(PkiError::Certificate)?;
        Ok(ControlPlaneCa { dir: dir.to_path_buf(), key, issuer, trusted })
    }

    pub fn trusted_ca(&self) -> &TrustedCa {
        &self.trusted
    }
    pub fn certificate_pem(&self) -> &str {
        self.trusted.pem()
    }
    /// What an enrolment token pins.
    pub fn fingerprint(&self) -> CaFingerprint {
        self.trusted.fingerprint()
    }

    /// Signs host `host_id`'s agent certificate for the key in `csr_pem`.
    ///
    /// Only the CSR's public key is used, once its signature proves the requester holds the
    /// private key: every name, usage and date comes from here (see [`crate::names`]): the host
    /// id as URI SAN and CN, the agent's DNS name, and `extra_names` (the addresses people reach
    /// the agent at, if any). Client and server authentication, [`LEAF_VALIDITY_DAYS`].
    /// The caller has checked the enrolment token that gave it `host_id`.
    pub fn sign_agent_csr(
        &self,
        host_id: HostId,
        csr_pem: &str,
        extra_names: &[SubjectName],
    ) -> Result<IssuedCertificate> {
        let public_key = parse_csr(csr_pem)?;
        let mut sans = vec![
            SanType::URI(names::host_uri(host_id).try_into().map_err(PkiError::Certificate)?),
            SanType::DnsName(names::agent_dns_name(host_id).try_into().map_err(PkiError::Certificate)?),
        ];
        for name in extra_names {
            sans.push(name.to_san()?);
        }
        let params = self.leaf_params(host_id.0.as_hyphenated().to_string(), sans);
        // A year from now is always within chrono's range.
        let not_after = chrono::DateTime::from_timestamp(params.not_after.unix_timestamp(), 0)
            .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC);
        let cert = params.signed_by(&public_key, &self.issuer, &self.key).map_err(PkiError::Certificate)?;
        tracing::info!(host = %host_id, %not_after, "signed an agent certificate");
        Ok(IssuedCertificate { certificate_pem: cert.pem(), ca_pem: self.certificate_pem().to_string(), not_after })
    }

    /// Issues a new control-plane certificate for `names` with a new key, without storing it
    /// ([`ControlPlaneCa::control_plane_identity`] stores it). The chain holds the CA after the
    /// certificate: an enrolling agent finds its pinned CA there.
    pub fn issue_control_plane_identity(&self, names: &[SubjectName]) -> Result<IssuedIdentity> {
        let key = KeyPair::generate().map_err(PkiError::Certificate)?;
        let mut sans = vec![SanType::URI(names::CONTROL_PLANE_URI.try_into().map_err(PkiError::Certificate)?)];
        for name in names {
            sans.push(name.to_san()?);
        }
        let params = self.leaf_params("drover control plane".to_string(), sans);
        let cert = params.signed_by(&key, &self.issuer, &self.key).map_err(PkiError::Certificate)?;
        let chain_pem = format!("{}{}", cert.pem(), self.certificate_pem());
        Ok(IssuedIdentity { chain_pem, key_pem: key.serialize_pem() })
    }

    /// The control plane's own identity, for its listener and for its connections to agents:
    /// loaded from the CA directory, or issued (and stored) if there is none, if it does not name
    /// exactly `names`, or if it ends within [`RENEW_BEFORE_DAYS`].
    pub fn control_plane_identity(&self, names: &[SubjectName]) -> Result<TlsIdentity> {
        let (key_path, cert_path) = (self.dir.join(CONTROL_PLANE_KEY), self.dir.join(CONTROL_PLANE_CERT));
        if files::exists(&cert_path)? && files::exists(&key_path)? {
            let identity = TlsIdentity::from_pem(&files::read_bounded(&cert_path)?, &files::read_private(&key_path)?)?;
            match self.still_good(&identity, names) {
                Ok(()) => return Ok(identity),
                Err(reason) => tracing::info!(%reason, "issuing a new control-plane certificate"),
            }
        }
        let issued = self.issue_control_plane_identity(names)?;
        files::write_private(&key_path, issued.key_pem.as_bytes())?;
        files::write_public(&cert_path, issued.chain_pem.as_bytes())?;
        issued.tls_identity()
    }

    /// Why a stored control-plane identity must be issued again, if it must.
    fn still_good(&self, identity: &TlsIdentity, names: &[SubjectName]) -> std::result::Result<(), String> {
        let end_entity = identity.chain.first().ok_or("no certificate")?;
        self.trusted.verify_client_certificate(end_entity).map_err(|e| e.to_string())?;
        let (_, parsed) = x509_parser::parse_x509_certificate(end_entity).map_err(|e| e.to_string())?;
        let renew_at = OffsetDateTime::now_utc() + Duration::days(RENEW_BEFORE_DAYS);
        if parsed.validity().not_after.to_datetime() < renew_at {
            return Err("it ends soon".into());
        }
        let mut have: Vec<String> = Vec::new();
        if let Ok(Some(san)) = parsed.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    x509_parser::extensions::GeneralName::DNSName(d) => have.push(d.to_string()),
                    x509_parser::extensions::GeneralName::IPAddress(bytes) => match bytes.len() {
                        4 => have.push(std::net::IpAddr::from(<[u8; 4]>::try_from(*bytes).unwrap()).to_string()),
                        16 => have.push(std::net::IpAddr::from(<[u8; 16]>::try_from(*bytes).unwrap()).to_string()),
                        _ => return Err("a malformed IP address".into()),
                    },
                    _ => {}
                }
            }
        }
        let mut want: Vec<String> = names.iter().map(ToString::to_string).collect();
        have.sort();
        want.sort();
        if have != want {
            return Err(format!("it names {have:?}, not {want:?}"));
        }
        let key_matches = {
            let key = rcgen::KeyPair::try_from(&identity.key).map_err(|e| e.to_string())?;
            spki_key(end_entity).map_err(|e| e.to_string())? == key.public_key_raw()
        };
        if !key_matches {
            return Err("its key is not the stored one".into());
        }
        Ok(())
    }

    fn leaf_params(&self, common_name: String, sans: Vec<SanType>) -> CertificateParams {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "drover");
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + Duration::days(LEAF_VALIDITY_DAYS);
        params.serial_number = Some(random_serial());
        params
    }
}

/// The public key of a CSR of at most [`MAX_CSR_PEM`] bytes, once its self-signature verifies.
fn parse_csr(csr_pem: &str) -> Result<rcgen::PublicKey> {
    if csr_pem.len() > MAX_CSR_PEM {
        return Err(PkiError::TooLarge { what: "certificate signing request", limit: MAX_CSR_PEM });
    }
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|e| PkiError::malformed("certificate signing request", e))?;
    // `from_der` verifies the request's signature with the key it carries.
    let request = CertificateSigningRequestParams::from_der(&der).map_err(PkiError::CsrRefused)?;
    Ok(request.public_key)
}

/// The raw subject public key of a certificate (what `KeyPair::public_key_raw` returns).
pub(crate) fn spki_key(der: &[u8]) -> Result<Vec<u8>> {
    let (_, parsed) = x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::malformed("certificate", e))?;
    Ok(parsed.tbs_certificate.subject_pki.subject_public_key.data.to_vec())
}

/// When a certificate ends.
pub(crate) fn not_after(der: &[u8]) -> Result<chrono::DateTime<chrono::Utc>> {
    let (_, parsed) = x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::malformed("certificate", e))?;
    let at = parsed.validity().not_after.timestamp();
    Ok(chrono::DateTime::from_timestamp(at, 0).unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC))
}

/// 16 random bytes, positive and without a leading zero byte (so it keeps its length in DER).
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}
