//! Passwords and tokens.
//!
//! Passwords are stored as argon2id hashes. Logins get an opaque bearer token (about 15 minutes)
//! and a single-use refresh token that rotates on every use; the store keeps only their BLAKE3
//! hashes, so a copy of the database holds no usable credential. Reusing a refresh token revokes
//! the whole login (a stolen token is worth nothing once the rightful client refreshes).

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine as _;
use drover_store::{TokenKind, TokenRecord};
use drover_types::{Error, Result, Timestamp, UserId};
use rand::RngCore;

/// Access tokens live 15 minutes; `expires_in` reports one second less so a client refreshes in time.
pub const ACCESS_TOKEN_SECS: i64 = 900;
pub const REFRESH_TOKEN_SECS: i64 = 24 * 3600;

pub fn hash_password(password: &str) -> Result<String> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Error::internal(format!("cannot hash password: {e}")))
}

/// A well-formed argon2id hash that matches no password: what an unknown user's login is checked
/// against, so that it takes as long as a known user's.
pub const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
}

/// A fresh random secret, URL-safe.
pub fn random_secret(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut buf);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

pub fn token_hash(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenPair {
    pub access_token: String,
    pub refresh_token: String,
    pub expires_in: i64,
}

/// Makes a token pair and the records to store for it.
pub fn issue(user: UserId, family: uuid::Uuid, now: Timestamp) -> (TokenPair, [TokenRecord; 2]) {
    let access = random_secret(32);
    let refresh = random_secret(32);
    let rec = |token: &str, kind, secs| TokenRecord {
        hash: token_hash(token),
        kind,
        user_id: user,
        family,
        expires_at: now + chrono::Duration::seconds(secs),
        used_at: None,
        created_at: now,
    };
    let records =
        [rec(&access, TokenKind::Access, ACCESS_TOKEN_SECS), rec(&refresh, TokenKind::Refresh, REFRESH_TOKEN_SECS)];
    (TokenPair { access_token: access, refresh_token: refresh, expires_in: ACCESS_TOKEN_SECS - 1 }, records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_verify_and_tokens_hash_stably() {
        let h = hash_password("s3cret").unwrap();
        assert!(verify_password("s3cret", &h));
        assert!(!verify_password("S3cret", &h));
        assert!(!verify_password("s3cret", "not a hash"));
        assert_eq!(token_hash("a"), token_hash("a"));
        assert_ne!(random_secret(32), random_secret(32));
    }
}
