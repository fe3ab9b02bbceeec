//! The merchant key pair Adobe Commerce Webhooks sign with: RSA-SHA256 (PKCS#1 v1.5) over the
//! body, base64 in `x-adobe-commerce-webhook-signature`; receivers verify with the public key
//! from the Commerce configuration ("Webhooks signature verification").
//!
//! Uses aws-lc-rs, the backend jsonwebtoken already builds, rather than a second RSA crate.

use std::sync::{Arc, OnceLock};

use aws_lc_rs::encoding::{AsDer, PublicKeyX509Der};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{KeyPair as _, RSA_PKCS1_SHA256, RsaKeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// Header carrying the Adobe-style signature.
pub const ADOBE_SIGNATURE_HEADER: &str = "x-adobe-commerce-webhook-signature";

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not a PEM \"PRIVATE KEY\" (PKCS#8) block")]
    NotPem,
    #[error("not an RSA PKCS#8 private key: {0}")]
    Rejected(String),
}

/// An RSA key pair.
pub struct WebhookKey {
    pair: RsaKeyPair,
}

impl std::fmt::Debug for WebhookKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookKey(..)")
    }
}

impl WebhookKey {
    /// A fresh 2048-bit key pair.
    pub fn generate() -> Self {
        Self { pair: RsaKeyPair::generate(KeySize::Rsa2048).expect("RSA key generation") }
    }

    /// Loads an unencrypted PKCS#8 PEM private key (`openssl genpkey -algorithm RSA`).
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, KeyError> {
        let der = pem_body(pem, "PRIVATE KEY").ok_or(KeyError::NotPem)?;
        let pair = RsaKeyPair::from_pkcs8(&der).map_err(|e| KeyError::Rejected(e.to_string()))?;
        Ok(Self { pair })
    }

    /// Base64 RSA-SHA256 signature of `body`.
    pub fn sign(&self, body: &[u8]) -> String {
        let mut signature = vec![0; self.pair.public_modulus_len()];
        self.pair.sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), body, &mut signature).expect("RSA signing");
        STANDARD.encode(signature)
    }

    /// The public half as a PEM `PUBLIC KEY` (X.509 SubjectPublicKeyInfo), as Commerce shows it.
    pub fn public_pem(&self) -> String {
        let der: PublicKeyX509Der<'static> = self.pair.public_key().as_der().expect("public key DER");
        let b64 = STANDARD.encode(der.as_ref());
        let lines: Vec<&str> =
            b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).expect("base64 is ASCII")).collect();
        format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n", lines.join("\n"))
    }
}

/// The DER inside a PEM block with this label.
pub fn pem_body(pem: &str, label: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem.find(&begin)? + begin.len();
    let stop = start + pem[start..].find(&end)?;
    let b64: String = pem[start..stop].chars().filter(|c| !c.is_whitespace()).collect();
    STANDARD.decode(b64).ok()
}

/// The store's key, generated on first use (RSA generation costs tens of milliseconds, which
/// every test that never signs would pay) unless one was loaded at start.
#[derive(Clone, Debug, Default)]
pub struct KeySlot(Arc<OnceLock<WebhookKey>>);

impl KeySlot {
    pub fn get(&self) -> &WebhookKey {
        self.0.get_or_init(WebhookKey::generate)
    }

    /// Installs a loaded key; `false` when one is already in use.
    pub fn set(&self, key: WebhookKey) -> bool {
        self.0.set(key).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use aws_lc_rs::signature::{RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};

    use super::*;

    #[test]
    fn signatures_verify_with_the_served_public_key_only() {
        let key = WebhookKey::generate();
        let public = pem_body(&key.public_pem(), "PUBLIC KEY").expect("PEM");
        let signature = STANDARD.decode(key.sign(b"{\"a\":1}")).unwrap();
        let verifier = UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &public);
        assert!(verifier.verify(b"{\"a\":1}", &signature).is_ok());
        assert!(verifier.verify(b"{\"a\":2}", &signature).is_err(), "another body fails");
        let other = pem_body(&WebhookKey::generate().public_pem(), "PUBLIC KEY").unwrap();
        assert!(UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &other).verify(b"{\"a\":1}", &signature).is_err());
        assert!(matches!(WebhookKey::from_pkcs8_pem("nope"), Err(KeyError::NotPem)));
    }

    #[test]
    fn a_pkcs8_pem_file_loads() {
        use aws_lc_rs::encoding::Pkcs8V1Der;
        let generated = WebhookKey::generate();
        let der: Pkcs8V1Der<'static> = generated.pair.as_der().unwrap();
        let pem =
            format!("-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n", STANDARD.encode(der.as_ref()));
        let loaded = WebhookKey::from_pkcs8_pem(&pem).expect("loads");
        assert_eq!(loaded.public_pem(), generated.public_pem());
    }
}
