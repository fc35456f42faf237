//! The rustls configurations of every drover connection, and the CA they trust.
//!
//! | connection                         | server config                          | client config              |
//! |------------------------------------|----------------------------------------|----------------------------|
//! | control plane → agent, agent → agent | [`server_config_requiring_client_cert`] | [`client_config`]          |
//! | agent → control plane              | [`server_config_optional_client_cert`] | [`client_config`]          |
//! | agent → control plane, enrolling   | (the same)                             | [`enrolment_client_config`] |
//!
//! Every config is built on the ring provider explicitly, never on a process-wide default, so
//! a library that installs another default cannot change what drover accepts. The mutual-TLS
//! configs speak TLS 1.3 only: both ends are drover. The control plane's listener also serves
//! people and scripts, so it keeps rustls' safe defaults (TLS 1.2 and 1.3).
//!
//! A server built here leaves ALPN to its caller (`alpn_protocols`), which knows whether it
//! speaks HTTP/2.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::error::{PkiError, Result};

/// The largest PEM text taken from a peer or a file for a certificate or a chain.
pub const MAX_CERTIFICATE_PEM: usize = 64 * 1024;

/// The crypto provider of every config: ring, chosen here rather than by a process default.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The BLAKE3 hash of a CA certificate's DER: what an enrolment token pins, so an agent that is
/// enrolling trusts only the control plane whose CA the administrator's token names.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CaFingerprint(pub(crate) [u8; 32]);

impl CaFingerprint {
    pub fn of_der(der: &[u8]) -> Self {
        CaFingerprint(*blake3::hash(der).as_bytes())
    }
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Display for CaFingerprint {
    /// `blake3:` and 64 hex digits, as an administrator compares it with `b3sum` of the DER.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("blake3:")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for CaFingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// The one CA certificate a drover process trusts: the control plane's.
#[derive(Clone)]
pub struct TrustedCa {
    der: CertificateDer<'static>,
    pem: String,
    fingerprint: CaFingerprint,
}

impl std::fmt::Debug for TrustedCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustedCa").field("fingerprint", &self.fingerprint).finish()
    }
}

impl TrustedCa {
    /// One CA certificate in PEM (at most [`MAX_CERTIFICATE_PEM`] bytes).
    pub fn from_pem(pem: &str) -> Result<Self> {
        let mut certs = parse_certificates("CA certificate", pem)?;
        if certs.len() != 1 {
            return Err(PkiError::malformed("CA certificate", format!("{} certificates, expected one", certs.len())));
        }
        let der = certs.remove(0);
        let (_, parsed) =
            x509_parser::parse_x509_certificate(&der).map_err(|e| PkiError::malformed("CA certificate", e))?;
        if !parsed.is_ca() {
            return Err(PkiError::malformed("CA certificate", "not a CA certificate"));
        }
        let fingerprint = CaFingerprint::of_der(&der);
        let pem = pem_encode("CERTIFICATE", &der);
        Ok(TrustedCa { der, pem, fingerprint })
    }

    /// [`TrustedCa::from_pem`], refused unless the certificate has the pinned fingerprint.
    pub fn from_pem_pinned(pem: &str, pin: &CaFingerprint) -> Result<Self> {
        let ca = Self::from_pem(pem)?;
        if ca.fingerprint != *pin {
            return Err(PkiError::CaPinMismatch);
        }
        Ok(ca)
    }

    pub fn fingerprint(&self) -> CaFingerprint {
        self.fingerprint
    }
    pub fn pem(&self) -> &str {
        &self.pem
    }
    pub fn der(&self) -> &CertificateDer<'static> {
        &self.der
    }

    fn root_store(&self) -> Result<Arc<RootCertStore>> {
        let mut roots = RootCertStore::empty();
        roots.add(self.der.clone()).map_err(PkiError::Tls)?;
        Ok(Arc::new(roots))
    }

    /// Checks that `end_entity` was issued by this CA, is valid now and may be used to
    /// authenticate a client, the way a server built by this crate will check it.
    pub(crate) fn verify_client_certificate(&self, end_entity: &CertificateDer<'_>) -> Result<()> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.root_store()?, crypto_provider())
            .build()
            .map_err(PkiError::Verifier)?;
        verifier
            .verify_client_cert(end_entity, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| PkiError::Untrusted(e.to_string()))
    }
}

/// A certificate chain (end entity first) and its private key: what a process presents.
pub struct TlsIdentity {
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity").field("chain_len", &self.chain.len()).field("key", &"<redacted>").finish()
    }
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        TlsIdentity { chain: self.chain.clone(), key: self.key.clone_key() }
    }
}

impl TlsIdentity {
    /// A chain in PEM (end entity first) and a PKCS#8 key in PEM.
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Self> {
        let chain = parse_certificates("certificate chain", chain_pem)?;
        if chain.is_empty() {
            return Err(PkiError::malformed("certificate chain", "no certificate"));
        }
        if key_pem.len() > MAX_CERTIFICATE_PEM {
            return Err(PkiError::TooLarge { what: "private key", limit: MAX_CERTIFICATE_PEM });
        }
        // The parse error is not shown: it could quote key material.
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|_| PkiError::malformed("private key", "not a PEM private key"))?;
        Ok(TlsIdentity { chain, key })
    }

    pub fn certificate_chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }
}

/// The server config of an agent: every client must present a certificate issued by `ca`
/// (the control plane's or a peer agent's); one without a certificate, or with any other,
/// fails the handshake. The server reads who connected with [`crate::peer_identity`].
pub fn server_config_requiring_client_cert(identity: &TlsIdentity, ca: &TrustedCa) -> Result<ServerConfig> {
    server_config_requiring_client_cert_live(&LiveIdentity::new(identity)?, ca)
}

/// [`server_config_requiring_client_cert`] presenting whatever `identity` holds when a client
/// connects: a renewed certificate is served from the next handshake on.
pub fn server_config_requiring_client_cert_live(identity: &LiveIdentity, ca: &TrustedCa) -> Result<ServerConfig> {
    let provider = crypto_provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(ca.root_store()?, provider.clone())
        .build()
        .map_err(PkiError::Verifier)?;
    Ok(ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(PkiError::Tls)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(identity.clone())))
}

/// The server config of the control plane: a client may come without a certificate (people,
/// scripts, and agents that are enrolling), but one that presents a certificate must present one
/// issued by `ca`, or the handshake fails. A route for agents refuses a connection whose
/// [`crate::peer_identity`] is not an agent.
pub fn server_config_optional_client_cert(identity: &TlsIdentity, ca: &TrustedCa) -> Result<ServerConfig> {
    server_config_optional_client_cert_live(&LiveIdentity::new(identity)?, ca)
}

/// [`server_config_optional_client_cert`] presenting whatever `identity` holds at each handshake.
pub fn server_config_optional_client_cert_live(identity: &LiveIdentity, ca: &TrustedCa) -> Result<ServerConfig> {
    let provider = crypto_provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(ca.root_store()?, provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(PkiError::Verifier)?;
    Ok(ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(PkiError::Tls)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(identity.clone())))
}

/// The client config of an enrolled agent or of the control plane: presents `identity` and
/// trusts only servers whose certificate `ca` issued. To reach an agent, connect with
/// [`crate::agent_server_name`] of the host meant, whatever its address.
pub fn client_config(identity: &TlsIdentity, ca: &TrustedCa) -> Result<ClientConfig> {
    client_config_live(&LiveIdentity::new(identity)?, ca)
}

/// [`client_config`] presenting whatever `identity` holds when a connection is made.
pub fn client_config_live(identity: &LiveIdentity, ca: &TrustedCa) -> Result<ClientConfig> {
    Ok(ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(PkiError::Tls)?
        .with_root_certificates(ca.root_store()?)
        .with_client_cert_resolver(Arc::new(identity.clone())))
}

/// A certificate and key that can be replaced while connections are served and made: the
/// configs built with it ([`server_config_requiring_client_cert_live`], [`client_config_live`])
/// ask it for the identity at each handshake, so an agent whose certificate was renewed presents
/// the new one from then on without restarting its listeners. Connections already made keep the
/// one they were made with. Cheap to clone (shared).
#[derive(Clone)]
pub struct LiveIdentity(Arc<std::sync::RwLock<Arc<CertifiedKey>>>);

impl std::fmt::Debug for LiveIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveIdentity").finish_non_exhaustive()
    }
}

impl LiveIdentity {
    pub fn new(identity: &TlsIdentity) -> Result<LiveIdentity> {
        Ok(LiveIdentity(Arc::new(std::sync::RwLock::new(certified_key(identity)?))))
    }

    /// Presents `identity` from the next handshake on.
    pub fn replace(&self, identity: &TlsIdentity) -> Result<()> {
        let key = certified_key(identity)?;
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = key;
        Ok(())
    }

    /// The end-entity certificate presented now.
    pub fn certificate(&self) -> CertificateDer<'static> {
        self.current().cert[0].clone()
    }

    fn current(&self) -> Arc<CertifiedKey> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The chain with its key loaded for signing; refused unless the key is the certificate's.
fn certified_key(identity: &TlsIdentity) -> Result<Arc<CertifiedKey>> {
    let key = crypto_provider().key_provider.load_private_key(identity.key.clone_key()).map_err(PkiError::Tls)?;
    let certified = CertifiedKey::new(identity.chain.clone(), key);
    certified.keys_match().map_err(PkiError::Tls)?;
    Ok(Arc::new(certified))
}

impl rustls::server::ResolvesServerCert for LiveIdentity {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl rustls::client::ResolvesClientCert for LiveIdentity {
    fn resolve(&self, _hints: &[&[u8]], schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        let key = self.current();
        // A server that accepts none of our key's schemes gets no certificate (and refuses us).
        key.key.choose_scheme(schemes).is_some().then_some(key)
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The client config of an agent that is enrolling: it has no certificate yet and knows the
/// control plane only by the CA fingerprint in its token. The server must send its CA in its
/// chain (the control plane's identity from [`crate::ControlPlaneCa::control_plane_identity`]
/// does); the connection is accepted only if that CA has the pinned fingerprint and issued the
/// server's certificate for the name connected to. So the token is never sent to anyone else.
pub fn enrolment_client_config(pin: &CaFingerprint) -> Result<ClientConfig> {
    let provider = crypto_provider();
    let verifier = PinnedCaVerifier { pin: *pin, provider: provider.clone() };
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(PkiError::Tls)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}

/// Verifies a server against the CA certificate in its own chain, once that CA is known by its
/// fingerprint: the ordinary WebPKI verification, with a root learned from the handshake.
#[derive(Debug)]
struct PinnedCaVerifier {
    pin: CaFingerprint,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|der| CaFingerprint::of_der(der) == self.pin)
            .ok_or(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer))?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let webpki =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(format!("building the pinned verifier: {e}")))?;
        webpki.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The certificates of a PEM text of at most [`MAX_CERTIFICATE_PEM`] bytes; other sections
/// (keys, CSRs) are skipped.
pub(crate) fn parse_certificates(what: &'static str, pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    if pem.len() > MAX_CERTIFICATE_PEM {
        return Err(PkiError::TooLarge { what, limit: MAX_CERTIFICATE_PEM });
    }
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::malformed(what, e))
}

pub(crate) fn pem_encode(tag: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {tag}-----\n");
    for line in body.as_bytes().chunks(64) {
        // Base64 is ASCII: every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {tag}-----\n"));
    out
}
