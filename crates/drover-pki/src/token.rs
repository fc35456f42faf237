//! One-time enrolment tokens.
//!
//! A token reads `drover-enrol-<base64url>`: 32 random bytes of secret followed by the 32-byte
//! [`CaFingerprint`] of the control plane's CA. The secret proves to the control plane that the
//! administrator sent this agent; the fingerprint lets the agent, which trusts nothing yet, check
//! that it is talking to that control plane before it sends the secret (see
//! [`crate::enrolment_client_config`]). The token is shown once, when it is made; the control
//! plane keeps only an [`EnrolmentRecord`]: the host, a BLAKE3 hash of the secret (derived with
//! a context of its own, so it is no hash used anywhere else), the expiry and whether it was used.
//! The secret is 256 random bits, so a fast hash is enough: there is nothing to guess.
//!
//! Everything here is pure; the store and the one-time rule live with the caller, and are
//! documented in the crate doc.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use drover_types::{HostId, Timestamp};
use rand::RngCore as _;
use serde::{Deserialize, Serialize};

use crate::error::{PkiError, Result};
use crate::tls::CaFingerprint;

pub const TOKEN_PREFIX: &str = "drover-enrol-";
/// The longest text [`PresentedToken::parse`] looks at.
pub const MAX_TOKEN_LEN: usize = 256;
const SECRET_LEN: usize = 32;
const HASH_CONTEXT: &str = "drover 2026-12 enrolment token secret v1";

/// A new token: its secret, to show once, and the record to store.
pub struct EnrolmentToken {
    secret: String,
    record: EnrolmentRecord,
}

impl std::fmt::Debug for EnrolmentToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrolmentToken").field("secret", &"<redacted>").field("record", &self.record).finish()
    }
}

impl EnrolmentToken {
    /// A token for host `host_id`, good for `ttl` from now, pinning the CA `ca`.
    pub fn new(host_id: HostId, ttl: std::time::Duration, ca: &CaFingerprint) -> Self {
        Self::new_at(host_id, ttl, ca, drover_types::now())
    }

    /// [`EnrolmentToken::new`] at a given time.
    pub fn new_at(host_id: HostId, ttl: std::time::Duration, ca: &CaFingerprint, now: Timestamp) -> Self {
        let mut secret = [0u8; SECRET_LEN];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        let mut raw = Vec::with_capacity(2 * SECRET_LEN);
        raw.extend_from_slice(&secret);
        raw.extend_from_slice(ca.as_bytes());
        let ttl = chrono::TimeDelta::from_std(ttl).unwrap_or(chrono::TimeDelta::MAX);
        let record = EnrolmentRecord {
            host_id,
            token_hash: TokenHash::of_secret(&secret),
            created_at: now,
            expires_at: now.checked_add_signed(ttl).unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC),
            consumed_at: None,
        };
        EnrolmentToken { secret: format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(raw)), record }
    }

    /// The token as the administrator passes it to `drover agent --enroll`. Show it once; never
    /// log it or store it.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    pub fn record(&self) -> &EnrolmentRecord {
        &self.record
    }
}

/// What the control plane stores of a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolmentRecord {
    pub host_id: HostId,
    /// The store's lookup key (unique): [`PresentedToken::hash`] finds the record.
    pub token_hash: TokenHash,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    /// Set when an enrolment succeeded with the token; a used token is refused.
    pub consumed_at: Option<Timestamp>,
}

impl EnrolmentRecord {
    /// Whether `presented` enrols host `host_id` at `now`: the secret matches (compared in
    /// constant time), the token is not used, not expired, and was issued for that host.
    pub fn verify(&self, presented: &PresentedToken, host_id: HostId, now: Timestamp) -> Result<()> {
        if presented.hash() != self.token_hash {
            return Err(PkiError::TokenInvalid);
        }
        if self.consumed_at.is_some() {
            return Err(PkiError::TokenConsumed);
        }
        if now >= self.expires_at {
            return Err(PkiError::TokenExpired(self.expires_at));
        }
        if host_id != self.host_id {
            return Err(PkiError::TokenHostMismatch);
        }
        Ok(())
    }

    /// Marks the token used. The store writes this in the same transaction that checked the
    /// record, conditionally on it being unused still (see the crate doc).
    pub fn consume(&mut self, now: Timestamp) {
        self.consumed_at = Some(now);
    }
}

/// The BLAKE3 hash of a token's secret; equality is constant-time. Written as 64 hex digits.
#[derive(Clone, Copy)]
pub struct TokenHash(blake3::Hash);

impl TokenHash {
    fn of_secret(secret: &[u8; SECRET_LEN]) -> Self {
        let mut hasher = blake3::Hasher::new_derive_key(HASH_CONTEXT);
        hasher.update(secret);
        TokenHash(hasher.finalize())
    }

    pub fn to_hex(&self) -> String {
        self.0.to_hex().to_string()
    }

    pub fn from_hex(hex: &str) -> Result<Self> {
        blake3::Hash::from_hex(hex).map(TokenHash).map_err(|e| PkiError::malformed("token hash", e))
    }
}

impl PartialEq for TokenHash {
    /// Constant-time: `blake3::Hash`'s equality does not stop at the first differing byte.
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
impl Eq for TokenHash {}

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenHash({})", self.to_hex())
    }
}

impl Serialize for TokenHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for TokenHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let hex = String::deserialize(d)?;
        TokenHash::from_hex(&hex).map_err(serde::de::Error::custom)
    }
}

/// A token as an agent presents it (and as `drover agent --enroll` reads it).
pub struct PresentedToken {
    secret: [u8; SECRET_LEN],
    ca: CaFingerprint,
}

impl std::fmt::Debug for PresentedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PresentedToken").field("secret", &"<redacted>").field("ca", &self.ca).finish()
    }
}

impl PresentedToken {
    /// Parses a token; surrounding white space is ignored. The error never quotes the token.
    pub fn parse(token: &str) -> Result<Self> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(PkiError::TooLarge { what: "enrolment token", limit: MAX_TOKEN_LEN });
        }
        let body = token
            .trim()
            .strip_prefix(TOKEN_PREFIX)
            .ok_or_else(|| PkiError::malformed("enrolment token", format!("does not start with {TOKEN_PREFIX:?}")))?;
        let raw = URL_SAFE_NO_PAD.decode(body).map_err(|_| PkiError::malformed("enrolment token", "not base64url"))?;
        if raw.len() != 2 * SECRET_LEN {
            return Err(PkiError::malformed("enrolment token", "wrong length"));
        }
        let (secret, ca) = raw.split_at(SECRET_LEN);
        Ok(PresentedToken {
            secret: secret.try_into().expect("split at SECRET_LEN"),
            ca: CaFingerprint(ca.try_into().expect("the rest is 32 bytes")),
        })
    }

    /// The hash the control plane looks the record up by.
    pub fn hash(&self) -> TokenHash {
        TokenHash::of_secret(&self.secret)
    }

    /// The control plane's CA, as the administrator's token pins it.
    pub fn ca_fingerprint(&self) -> CaFingerprint {
        self.ca
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> CaFingerprint {
        CaFingerprint::of_der(b"a CA")
    }

    #[test]
    fn a_token_round_trips_and_pins_the_ca() {
        let host = HostId::new();
        let token = EnrolmentToken::new(host, std::time::Duration::from_secs(3600), &ca());
        assert!(token.secret().starts_with(TOKEN_PREFIX));
        let presented = PresentedToken::parse(&format!(" {}\n", token.secret())).unwrap();
        assert_eq!(presented.ca_fingerprint(), ca());
        assert_eq!(presented.hash(), token.record().token_hash);
        token.record().verify(&presented, host, drover_types::now()).unwrap();
    }

    #[test]
    fn secrets_stay_out_of_debug_and_the_record() {
        let token = EnrolmentToken::new(HostId::new(), std::time::Duration::from_secs(60), &ca());
        let body = token.secret().strip_prefix(TOKEN_PREFIX).unwrap();
        let secret_part = &body[..40];
        assert!(!format!("{token:?}").contains(secret_part));
        let presented = PresentedToken::parse(token.secret()).unwrap();
        assert!(!format!("{presented:?}").contains(secret_part));
        let stored = serde_json::to_string(token.record()).unwrap();
        assert!(!stored.contains(secret_part));
        let back: EnrolmentRecord = serde_json::from_str(&stored).unwrap();
        assert_eq!(&back, token.record());
    }

    #[test]
    fn malformed_tokens_are_bad_requests() {
        use crate::PkiErrorKind::BadRequest;
        for bad in ["", "drover-enrol-", "drover-enrol-!!!!", "other-abc", &"x".repeat(MAX_TOKEN_LEN + 1)] {
            assert_eq!(PresentedToken::parse(bad).unwrap_err().kind(), BadRequest, "{bad:?}");
        }
        let short = format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode([0u8; 63]));
        assert_eq!(PresentedToken::parse(&short).unwrap_err().kind(), BadRequest);
    }

    #[test]
    fn a_token_hash_round_trips_through_hex() {
        let token = EnrolmentToken::new(HostId::new(), std::time::Duration::from_secs(60), &ca());
        let hash = token.record().token_hash;
        assert_eq!(TokenHash::from_hex(&hash.to_hex()).unwrap(), hash);
        assert!(TokenHash::from_hex("zz").is_err());
    }
}
