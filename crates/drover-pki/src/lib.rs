//! drover's public-key infrastructure: who may talk to whom between the control plane and the
//! agents, and how an agent becomes one of them. No HTTP and no store: the API crates carry
//! the messages, the store keeps the token records.
//!
//! # Trust
//! The control plane holds one CA ([`ControlPlaneCa`]). It is the only root anyone trusts: every
//! agent and the control plane present a certificate it issued, and every connection between
//! them is mutual TLS ([`server_config_requiring_client_cert`], [`client_config`]). A server
//! learns who connected from the verified certificate ([`peer_identity`]): a host id or the
//! control plane. How identities are written into certificates is in [`names`].
//!
//! # Enrolment
//! ```text
//!  administrator          control plane                          agent (new host)
//!  host create  ────────▶ EnrolmentToken::new(host, ttl, ca fp)
//!               ◀──────── token (shown once); stores EnrolmentRecord
//!  drover agent --enroll <url> <token> ───────────────────────────▶ PresentedToken::parse
//!                                                                  AgentIdentity::generate → CSR
//!                         ◀── TLS, enrolment_client_config(pin) ── (server must chain to the pinned CA)
//!                         ◀── POST token + CSR ───────────────────
//!                         look up record by PresentedToken::hash,
//!                         EnrolmentRecord::verify, consume,
//!                         ControlPlaneCa::sign_agent_csr
//!                         ── certificate + CA ───────────────────▶ PendingAgentIdentity::install
//!                         ◀═══════════ mutual TLS from now on ═══▶ AgentIdentity::load
//! ```
//!
//! # Storing tokens (the caller's part)
//! The control plane stores the [`EnrolmentRecord`] of a token, never the token: the host id,
//! [`TokenHash`] (hex, a unique column), `created_at`, `expires_at`, `consumed_at`. On an
//! enrolment request it:
//! 1. parses the token ([`PresentedToken::parse`]: a malformed one is a bad request);
//! 2. in one transaction, finds the record by [`PresentedToken::hash`] (none: unauthorized),
//!    calls [`EnrolmentRecord::verify`] with the host id the request is for and the current time,
//!    and marks it used with a conditional update (`SET consumed_at = ? WHERE token_hash = ? AND
//!    consumed_at IS NULL`; zero rows changed means another request won: unauthorized). A token
//!    is used up by a successful check even if signing then fails: the administrator issues a new
//!    one, which is cheaper than reasoning about a token used twice;
//! 3. signs the CSR for the record's host ([`ControlPlaneCa::sign_agent_csr`]).
//!
//! Making a new token for a host should delete its earlier ones; expired and used records can
//! be deleted at any time. Neither tokens nor private keys are ever logged: the `Debug` of every
//! type holding one is redacted, and errors never quote them.
//!
//! # Errors
//! One [`PkiError`] whose [`PkiError::kind`] the HTTP layer maps: [`PkiErrorKind::BadRequest`]
//! (400), [`PkiErrorKind::Unauthorized`] (401), [`PkiErrorKind::Expired`] (401, "ask for a new
//! token"), [`PkiErrorKind::Internal`] (500).
//!
//! # Files
//! Private directories are 0700 and private files 0600, created so from the start; one found
//! with wider permissions is refused, not repaired. Every file is written durably and read
//! with a size bound, and every parser of outside input is bounded ([`MAX_CSR_PEM`],
//! [`MAX_CERTIFICATE_PEM`], [`MAX_TOKEN_LEN`]).

mod agent;
mod ca;
mod error;
mod files;
pub mod names;
mod tls;
mod token;

pub use agent::{AgentIdentity, PendingAgentIdentity};
pub use ca::{
    CA_VALIDITY_DAYS, ControlPlaneCa, IssuedCertificate, IssuedIdentity, LEAF_VALIDITY_DAYS, MAX_CSR_PEM,
    RENEW_BEFORE_DAYS,
};
pub use error::{PkiError, PkiErrorKind, Result};
pub use names::{PeerIdentity, SubjectName, agent_dns_name, agent_server_name, peer_host_id, peer_identity};
pub use tls::{
    CaFingerprint, LiveIdentity, MAX_CERTIFICATE_PEM, TlsIdentity, TrustedCa, client_config, client_config_live,
    crypto_provider, enrolment_client_config, server_config_optional_client_cert,
    server_config_optional_client_cert_live, server_config_requiring_client_cert,
    server_config_requiring_client_cert_live,
};
pub use token::{EnrolmentRecord, EnrolmentToken, MAX_TOKEN_LEN, PresentedToken, TOKEN_PREFIX, TokenHash};
