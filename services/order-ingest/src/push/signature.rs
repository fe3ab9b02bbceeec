//! Who may notify: HMAC-signed webhooks (the scheme of generic webhook modules, with up to two
//! secrets so one can be rotated without downtime) and Adobe Commerce Webhooks' RSA-SHA256
//! signature, verified with the public key shown in the Commerce admin.
//!
//! Headers are checked before the body is read ([`Verifier::precheck`]): a request without
//! any signature, or with a stale HMAC timestamp, is refused without spending a body read on it.

use std::time::Duration;

use axum::http::HeaderMap;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub const SIGNATURE_HEADER: &str = "x-elo-webhook-signature";
/// Base64 RSA-SHA256 (PKCS#1 v1.5) of the body, by Adobe Commerce Webhooks.
pub const ADOBE_SIGNATURE_HEADER: &str = "x-adobe-commerce-webhook-signature";

/// The accepted signing schemes.
#[derive(Clone)]
pub struct Verifier {
    /// Current secret first; a second one is accepted during a rotation.
    pub hmac_secrets: Vec<String>,
    /// Adobe Commerce Webhooks' public key (PEM), if that scheme is on.
    pub adobe_key: Option<std::sync::Arc<jsonwebtoken::DecodingKey>>,
    /// Accepted clock difference for HMAC timestamps (replay protection).
    pub tolerance: Duration,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets never reach a log line.
        f.debug_struct("Verifier")
            .field("hmac_secrets", &self.hmac_secrets.len())
            .field("adobe_key", &self.adobe_key.is_some())
            .field("tolerance", &self.tolerance)
            .finish()
    }
}

impl Verifier {
    /// HMAC only, with one secret.
    pub fn hmac(secret: impl Into<String>, tolerance: Duration) -> Self {
        Self { hmac_secrets: vec![secret.into()], adobe_key: None, tolerance }
    }

    /// Reads an Adobe Commerce public key (`-----BEGIN PUBLIC KEY-----`).
    pub fn adobe_key_from_pem(pem: &[u8]) -> Result<jsonwebtoken::DecodingKey, String> {
        jsonwebtoken::DecodingKey::from_rsa_pem(pem).map_err(|e| format!("not an RSA public key in PEM: {e}"))
    }

    /// What the headers alone can refuse: no signature of an accepted scheme, or an HMAC
    /// timestamp outside the tolerance.
    pub fn precheck(&self, headers: &HeaderMap, now_secs: i64) -> Result<(), &'static str> {
        if self.adobe_key.is_some() && headers.contains_key(ADOBE_SIGNATURE_HEADER) {
            return Ok(());
        }
        let value = header(headers, SIGNATURE_HEADER).ok_or("missing signature header")?;
        fresh_timestamp(value, now_secs, self.tolerance).map(|_| ())
    }

    /// The full check against the body.
    pub fn verify(&self, headers: &HeaderMap, body: &[u8], now_secs: i64) -> Result<(), &'static str> {
        if let (Some(key), Some(signature)) = (&self.adobe_key, header(headers, ADOBE_SIGNATURE_HEADER)) {
            return verify_adobe(key, signature, body);
        }
        verify_signature(&self.hmac_secrets, header(headers, SIGNATURE_HEADER), body, now_secs, self.tolerance)
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The `t=` of an HMAC signature header, if within `tolerance` of now. Any `i64` is handled:
/// a hostile timestamp is stale, never an overflow.
fn fresh_timestamp(value: &str, now_secs: i64, tolerance: Duration) -> Result<i64, &'static str> {
    let t = value
        .split(',')
        .filter_map(|part| part.trim().split_once('='))
        .find(|(k, _)| *k == "t")
        .and_then(|(_, ts)| ts.parse::<i64>().ok())
        .ok_or("signature has no timestamp")?;
    match now_secs.checked_sub(t) {
        Some(skew) if skew.unsigned_abs() <= tolerance.as_secs() => Ok(t),
        _ => Err("signature timestamp outside the tolerance"),
    }
}

/// Checks `t=<secs>,v1=<hex>` against the body, any of the secrets and the clock.
pub fn verify_signature(
    secrets: &[String],
    header_value: Option<&str>,
    body: &[u8],
    now_secs: i64,
    tolerance: Duration,
) -> Result<(), &'static str> {
    let value = header_value.ok_or("missing signature header")?;
    let t = fresh_timestamp(value, now_secs, tolerance)?;
    let candidates: Vec<Vec<u8>> = value
        .split(',')
        .filter_map(|part| part.trim().split_once('='))
        .filter(|(k, _)| *k == "v1")
        .filter_map(|(_, hex)| decode_hex(hex))
        .collect();
    for secret in secrets {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
        mac.update(t.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        // verify_slice compares in constant time.
        if candidates.iter().any(|c| mac.clone().verify_slice(c).is_ok()) {
            return Ok(());
        }
    }
    Err("signature does not match")
}

/// Adobe Commerce Webhooks: base64 RSA-SHA256 of the raw body.
fn verify_adobe(key: &jsonwebtoken::DecodingKey, signature: &str, body: &[u8]) -> Result<(), &'static str> {
    let raw =
        base64::engine::general_purpose::STANDARD.decode(signature.trim()).map_err(|_| "signature is not base64")?;
    // jsonwebtoken takes the signature in JWS form (base64url, no padding).
    let jws = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
    match jsonwebtoken::crypto::verify(&jws, body, key, jsonwebtoken::Algorithm::RS256) {
        Ok(true) => Ok(()),
        _ => Err("signature does not match"),
    }
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Signed exactly as the sandbox's Adobe Commerce simulator signs (its own RSA key).
    fn adobe_signed(key: &sandbox::magento::signing::WebhookKey, body: &[u8]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(ADOBE_SIGNATURE_HEADER, key.sign(body).parse().unwrap());
        headers
    }

    #[test]
    fn adobe_commerce_rsa_signatures_verify_with_the_public_key() {
        let key = sandbox::magento::signing::WebhookKey::generate();
        let public = Verifier::adobe_key_from_pem(key.public_pem().as_bytes()).unwrap();
        let verifier = Verifier {
            adobe_key: Some(std::sync::Arc::new(public)),
            ..Verifier::hmac("unused-secret-0123", Duration::from_secs(300))
        };
        let body = br#"{"order":{"entity_id":1}}"#;
        let headers = adobe_signed(&key, body);
        assert_eq!(verifier.precheck(&headers, 0), Ok(()));
        assert_eq!(verifier.verify(&headers, body, 0), Ok(()));
        assert!(verifier.verify(&headers, br#"{"order":{"entity_id":2}}"#, 0).is_err(), "the body is signed");
        let mut forged = headers.clone();
        forged.insert(ADOBE_SIGNATURE_HEADER, "bm90IGEgc2lnbmF0dXJl".parse().unwrap());
        assert!(verifier.verify(&forged, body, 0).is_err());
        let hmac_only = Verifier::hmac("unused-secret-0123", Duration::from_secs(300));
        assert!(hmac_only.precheck(&headers, 0).is_err(), "the scheme is off without a key");
        assert!(Verifier::adobe_key_from_pem(b"not a key").is_err());
        let other = sandbox::magento::signing::WebhookKey::generate();
        assert!(verifier.verify(&adobe_signed(&other, body), body, 0).is_err(), "another store's key");
    }

    #[test]
    fn two_secrets_are_accepted_during_a_rotation() {
        let body = b"{}";
        let signed_with = |secret: &str| sandbox::magento::webhook::sign(secret, 100, body);
        let secrets = vec!["new-secret-0123456".to_owned(), "old-secret-0123456".to_owned()];
        let tolerance = Duration::from_secs(10);
        for secret in &secrets {
            assert_eq!(verify_signature(&secrets, Some(&signed_with(secret)), body, 100, tolerance), Ok(()));
        }
        let retired = signed_with("retired-secret-0123");
        assert!(verify_signature(&secrets, Some(&retired), body, 100, tolerance).is_err());
    }

    #[test]
    fn hostile_timestamps_are_stale_never_an_overflow() {
        let secrets = vec!["k".to_owned()];
        let tolerance = Duration::from_secs(300);
        for t in [i64::MIN, i64::MIN + 1, i64::MAX, -1] {
            let header = format!("t={t},v1=00");
            assert_eq!(
                verify_signature(&secrets, Some(&header), b"", 1_700_000_000, tolerance),
                Err("signature timestamp outside the tolerance"),
                "t={t}"
            );
        }
        assert!(fresh_timestamp("t=5", i64::MIN, tolerance).is_err());
    }
}
