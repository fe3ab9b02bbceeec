//! OAuth 1.0a request signing (RFC 5849), the way Magento authenticates integrations by
//! default: every request carries `Authorization: OAuth ...` signed with HMAC-SHA256 over the
//! signature base string, keyed by the consumer secret and the access token secret. No token to
//! fetch or renew, and no admin login (which 2FA usually forbids on 2.4).

use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// An integration's credentials, as Magento shows them on activation (System > Integrations).
#[derive(Clone, Deserialize)]
pub struct Credentials {
    pub consumer_key: String,
    pub consumer_secret: String,
    pub access_token: String,
    pub access_token_secret: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets never reach a log line.
        f.debug_struct("Credentials").field("consumer_key", &self.consumer_key).finish_non_exhaustive()
    }
}

/// RFC 3986 percent-encoding: unreserved characters kept, every other byte `%XX` (upper case).
pub fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `scheme://host[:port]/path` with scheme and host lower-cased and a default port dropped.
fn base_url(url: &str) -> String {
    let without_query = url.split(['?', '#']).next().unwrap_or_default();
    let (scheme, rest) = without_query.split_once("://").unwrap_or(("http", without_query));
    let scheme = scheme.to_ascii_lowercase();
    let (authority, path) = rest.find('/').map_or((rest, "/"), |i| (&rest[..i], &rest[i..]));
    let mut authority = authority.to_ascii_lowercase();
    let default_port = if scheme == "https" { ":443" } else { ":80" };
    if authority.ends_with(default_port) {
        authority.truncate(authority.len() - default_port.len());
    }
    format!("{scheme}://{authority}{path}")
}

/// The `Authorization` header for `method url` (query parameters are signed too).
pub fn authorization(credentials: &Credentials, method: &str, url: &str, nonce: &str, timestamp: i64) -> String {
    let mut oauth = vec![
        ("oauth_consumer_key", credentials.consumer_key.clone()),
        ("oauth_nonce", nonce.to_owned()),
        ("oauth_signature_method", "HMAC-SHA256".to_owned()),
        ("oauth_timestamp", timestamp.to_string()),
        ("oauth_token", credentials.access_token.clone()),
        ("oauth_version", "1.0".to_owned()),
    ];
    let query = url.split_once('?').map(|(_, q)| q).unwrap_or_default();
    let mut params: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .map(|(k, v)| (encode(&decode(k)), encode(&decode(v))))
        .chain(oauth.iter().map(|(k, v)| (encode(k), encode(v))))
        .collect();
    params.sort();
    let normalised: Vec<String> = params.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    let base = format!("{}&{}&{}", method.to_ascii_uppercase(), encode(&base_url(url)), encode(&normalised.join("&")));
    let key = format!("{}&{}", encode(&credentials.consumer_secret), encode(&credentials.access_token_secret));
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(base.as_bytes());
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    oauth.push(("oauth_signature", signature));
    let fields: Vec<String> = oauth.iter().map(|(k, v)| format!("{k}=\"{}\"", encode(v))).collect();
    format!("OAuth {}", fields.join(", "))
}

/// A nonce never repeated by this process (Magento refuses a nonce seen in the last 10 min).
pub fn nonce() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let digest = Sha256::digest(format!("{now}:{n}:{}", std::process::id()).as_bytes());
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox_credentials() -> (sandbox::magento::oauth::Credentials, Credentials) {
        let magento = sandbox::magento::Magento::new(Default::default(), Default::default());
        let theirs = magento.integration_credentials();
        let ours = Credentials {
            consumer_key: theirs.consumer_key.clone(),
            consumer_secret: theirs.consumer_secret.clone(),
            access_token: theirs.access_token.clone(),
            access_token_secret: theirs.access_token_secret.clone(),
        };
        (theirs, ours)
    }

    /// Runs the sandbox's verifier (Magento's rules) on a request we signed.
    fn verify(theirs: &sandbox::magento::oauth::Credentials, url: &str, header: &str, now: i64) -> Result<(), String> {
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let request = sandbox::magento::oauth::Request { method: "GET", base_url: base, query, form: None };
        let params = sandbox::magento::oauth::header_params(header).ok_or("not an OAuth header")?;
        let mut nonces = sandbox::magento::oauth::Nonces::default();
        sandbox::magento::oauth::verify(&request, &params, theirs, &mut nonces, now)
            .map_err(|e| format!("{:?}", e.body))
    }

    #[test]
    fn requests_signed_here_pass_magentos_verification() {
        let (theirs, ours) = sandbox_credentials();
        let url = format!(
            "http://127.0.0.1:8701/rest/V1/orders?{}",
            crate::wiring::keyset_query(1, crate::poll::Keyset::new(1_793_491_200_000, 42), 100)
        );
        let now = 1_793_491_200;
        let header = authorization(&ours, "GET", &url, &nonce(), now);
        assert_eq!(verify(&theirs, &url, &header, now), Ok(()), "search criteria in the query are signed");
        let plain = "http://127.0.0.1:8701/rest/V1/orders/7";
        assert_eq!(verify(&theirs, plain, &authorization(&ours, "GET", plain, &nonce(), now), now), Ok(()));
        let wrong = Credentials { access_token_secret: "not-it".into(), ..ours.clone() };
        assert!(verify(&theirs, plain, &authorization(&wrong, "GET", plain, &nonce(), now), now).is_err());
        assert_ne!(nonce(), nonce());
        assert_eq!(
            base_url("HTTPS://Shop.Example.com:443/rest/V1/orders?x=1"),
            "https://shop.example.com/rest/V1/orders"
        );
        assert!(!format!("{ours:?}").contains(&ours.consumer_secret), "secrets stay out of Debug");
    }
}
