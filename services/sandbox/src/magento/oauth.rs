//! OAuth 1.0a request signing as Magento verifies integration calls (RFC 5849; Magento's
//! `Framework\Oauth\Oauth::validateAccessTokenRequest`): HMAC-SHA1 or HMAC-SHA256 over the
//! signature base string, keyed by the consumer secret and the access token secret.
//!
//! Magento checks, in this order: protocol parameters present, signature method supported,
//! consumer known, nonce unused (the nonce is recorded before the signature is checked, so a
//! request with a bad signature still uses up its nonce), access token of that consumer, then
//! the signature. Failures are `Framework\Oauth\Exception`s, which the Web API answers 401 with
//! the message; missing parameters are input errors (400).

use std::collections::{HashMap, VecDeque};

use aws_lc_rs::hmac;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::json;

use super::search::MagentoError;

/// Magento's `Nonce\Generator::TIME_DEVIATION`: timestamps may run this far ahead; nonces are
/// remembered this long (Magento's cron purges older ones).
pub const TIME_DEVIATION_SECS: i64 = 600;

/// The integration's credentials, as Magento shows them on activation.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Credentials {
    pub consumer_key: String,
    pub consumer_secret: String,
    pub access_token: String,
    pub access_token_secret: String,
}

/// Integration id Magento reports in nonce errors.
const CONSUMER_ID: i64 = 1;

/// Nonces seen within the window.
#[derive(Debug, Default)]
pub struct Nonces {
    seen: HashMap<String, i64>,
    order: VecDeque<(i64, String)>,
}

impl Nonces {
    /// Records `nonce`; `false` when it was already used within the window.
    fn record(&mut self, nonce: &str, now_s: i64) -> bool {
        while self.order.front().is_some_and(|(t, _)| now_s - t > TIME_DEVIATION_SECS) {
            if let Some((_, old)) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        if self.seen.contains_key(nonce) {
            return false;
        }
        self.seen.insert(nonce.to_owned(), now_s);
        self.order.push_back((now_s, nonce.to_owned()));
        true
    }
}

/// One request as the signer saw it.
pub struct Request<'a> {
    pub method: &'a str,
    /// `scheme://host[:port]/path`, before normalisation.
    pub base_url: &'a str,
    /// The raw query string.
    pub query: &'a str,
    /// `application/x-www-form-urlencoded` body parameters, if the body is a form.
    pub form: Option<&'a str>,
}

/// RFC 3986 percent-encoding as RFC 5849 §3.6 wants it (unreserved characters kept).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Form decoding (`+` is a space), as RFC 5849 §3.4.1.3.1 reads query and body parameters.
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn form_pairs(s: &str) -> impl Iterator<Item = (String, String)> + '_ {
    s.split('&').filter(|p| !p.is_empty()).map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        (decode(k), decode(v))
    })
}

/// The `oauth_*` parameters of an `Authorization: OAuth ...` header (`realm` dropped).
pub fn header_params(authorization: &str) -> Option<Vec<(String, String)>> {
    let (scheme, rest) = authorization.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("oauth") {
        return None;
    }
    let params = rest
        .split(',')
        .filter_map(|part| {
            let (k, v) = part.trim().split_once('=')?;
            let v = v.trim().trim_matches('"');
            Some((decode(k.trim()), decode(v)))
        })
        .filter(|(k, _)| k != "realm")
        .collect();
    Some(params)
}

/// `scheme://host[:port]/path` lower-cased where RFC 5849 §3.4.1.2 says, default ports dropped.
fn normalise_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("http", url));
    let scheme = scheme.to_ascii_lowercase();
    let (authority, path) = rest.find('/').map_or((rest, "/"), |i| (&rest[..i], &rest[i..]));
    let path = path.split(['?', '#']).next().unwrap_or("/");
    let mut authority = authority.to_ascii_lowercase();
    let default_port = if scheme == "https" { ":443" } else { ":80" };
    if authority.ends_with(default_port) {
        authority.truncate(authority.len() - default_port.len());
    }
    format!("{scheme}://{authority}{path}")
}

/// The signature base string (RFC 5849 §3.4.1) over `oauth` (without `oauth_signature`).
pub fn base_string(request: &Request<'_>, oauth: &[(String, String)]) -> String {
    let mut params: Vec<(String, String)> = form_pairs(request.query)
        .chain(request.form.into_iter().flat_map(form_pairs))
        .chain(oauth.iter().filter(|(k, _)| k != "oauth_signature").cloned())
        .map(|(k, v)| (encode(&k), encode(&v)))
        .collect();
    params.sort();
    let normalised: Vec<String> = params.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!(
        "{}&{}&{}",
        request.method.to_ascii_uppercase(),
        encode(&normalise_url(request.base_url)),
        encode(&normalised.join("&"))
    )
}

/// Base64 HMAC of the base string for `method` (`HMAC-SHA1` or `HMAC-SHA256`).
pub fn signature(method: &str, base: &str, consumer_secret: &str, token_secret: &str) -> Option<String> {
    let algorithm = match method {
        "HMAC-SHA1" => hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
        "HMAC-SHA256" => hmac::HMAC_SHA256,
        _ => return None,
    };
    let key = hmac::Key::new(algorithm, format!("{}&{}", encode(consumer_secret), encode(token_secret)).as_bytes());
    Some(STANDARD.encode(hmac::sign(&key, base.as_bytes()).as_ref()))
}

/// An `Authorization` header for `request`, signed with `credentials` (for tests and tools).
pub fn authorization(
    request: &Request<'_>,
    credentials: &Credentials,
    method: &str,
    nonce: &str,
    timestamp: i64,
) -> String {
    let mut oauth: Vec<(String, String)> = [
        ("oauth_consumer_key", credentials.consumer_key.as_str()),
        ("oauth_nonce", nonce),
        ("oauth_signature_method", method),
        ("oauth_timestamp", &timestamp.to_string()),
        ("oauth_token", credentials.access_token.as_str()),
        ("oauth_version", "1.0"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    let base = base_string(request, &oauth);
    let signed = signature(method, &base, &credentials.consumer_secret, &credentials.access_token_secret)
        .expect("supported signature method");
    oauth.push(("oauth_signature".into(), signed));
    let fields: Vec<String> = oauth.iter().map(|(k, v)| format!("{k}=\"{}\"", encode(v))).collect();
    format!("OAuth {}", fields.join(", "))
}

fn oauth_error(message: &str, parameters: serde_json::Value) -> MagentoError {
    MagentoError::new(401, message, parameters)
}

/// Verifies an OAuth-signed request; `oauth` are its protocol parameters.
pub fn verify(
    request: &Request<'_>,
    oauth: &[(String, String)],
    credentials: &Credentials,
    nonces: &mut Nonces,
    now_s: i64,
) -> Result<(), MagentoError> {
    let get = |name: &str| oauth.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    if let Some(version) = get("oauth_version").filter(|v| *v != "1.0") {
        return Err(MagentoError::new(400, "The \"%1\" Oauth version isn't supported.", json!([version])));
    }
    const REQUIRED: &[&str] = &[
        "oauth_consumer_key",
        "oauth_signature",
        "oauth_signature_method",
        "oauth_nonce",
        "oauth_timestamp",
        "oauth_token",
    ];
    if let Some(missing) = REQUIRED.iter().find(|name| get(name).is_none()) {
        return Err(MagentoError::new(
            400,
            "\"%fieldName\" is required. Enter and try again.",
            json!({"fieldName": missing}),
        ));
    }
    let field = |name: &str| get(name).unwrap_or_default();
    let method = field("oauth_signature_method");
    if !matches!(method, "HMAC-SHA1" | "HMAC-SHA256") {
        return Err(MagentoError::new(400, "Signature method %1 is not supported", json!([method])));
    }
    if field("oauth_consumer_key") != credentials.consumer_key {
        return Err(oauth_error(
            "A consumer with \"%1\" ID doesn't exist. Verify the ID and try again.",
            json!([field("oauth_consumer_key")]),
        ));
    }
    let timestamp: i64 = field("oauth_timestamp").parse().unwrap_or(0);
    if timestamp <= 0 || timestamp > now_s + TIME_DEVIATION_SECS {
        // Magento's own input error here is swallowed into this generic one.
        return Err(oauth_error("An error occurred validating the nonce", json!([])));
    }
    if !nonces.record(field("oauth_nonce"), now_s) {
        return Err(oauth_error("The nonce is already being used by the consumer with ID %1", json!([CONSUMER_ID])));
    }
    if field("oauth_token") != credentials.access_token {
        return Err(oauth_error("A token with the \"%1\" ID doesn't exist.", json!([field("oauth_token")])));
    }
    let expected =
        signature(method, &base_string(request, oauth), &credentials.consumer_secret, &credentials.access_token_secret)
            .expect("method checked above");
    if expected != field("oauth_signature") {
        return Err(oauth_error("The signature is invalid. Verify and try again.", json!([])));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// X (Twitter)'s published "Creating a signature" example, the usual OAuth 1.0a vector.
    #[test]
    fn the_published_hmac_sha1_example_signs_and_verifies() {
        let credentials = Credentials {
            consumer_key: "xvz1evFS4wEEPTGEFPHBog".into(),
            consumer_secret: "kAcSOqF21Fu85e7zjz7ZN2U4ZRhfV3WpwPAoE3Z7kBw".into(),
            access_token: "370773112-GmHxMAgYyLbNEtIKZeRNFsMKPR9EyMZeS9weJAEb".into(),
            access_token_secret: "LswwdoUaIvS8ltyTt5jkRh4J50vUPVVHtR2YPi5kE".into(),
        };
        let request = Request {
            method: "post",
            base_url: "HTTPS://API.twitter.com:443/1.1/statuses/update.json",
            query: "include_entities=true",
            form: Some("status=Hello%20Ladies%20%2B%20Gentlemen%2C%20a%20signed%20OAuth%20request%21"),
        };
        let header = authorization(
            &request,
            &credentials,
            "HMAC-SHA1",
            "kYjzVBB8Y0ZFabxSWbWovY3uYSQ2pTgmZeNu2VS4cg",
            1318622958,
        );
        let oauth = header_params(&header).unwrap();
        let signed = oauth.iter().find(|(k, _)| k == "oauth_signature").unwrap();
        assert_eq!(signed.1, "hCtSmYh+iHYCEqBWrE7C7hYmtUk=");
        assert!(base_string(&request, &oauth).starts_with(
            "POST&https%3A%2F%2Fapi.twitter.com%2F1.1%2Fstatuses%2Fupdate.json&include_entities%3Dtrue%26oauth_consumer_key"
        ));
        let mut nonces = Nonces::default();
        assert!(verify(&request, &oauth, &credentials, &mut nonces, 1318622958).is_ok());
        let again = verify(&request, &oauth, &credentials, &mut nonces, 1318622959).unwrap_err();
        assert_eq!(again.status, 401, "a nonce is used once");
    }

    #[test]
    fn nonces_are_forgotten_after_the_window() {
        let mut nonces = Nonces::default();
        assert!(nonces.record("n", 1000));
        assert!(!nonces.record("n", 1000 + TIME_DEVIATION_SECS));
        assert!(nonces.record("other", 1001 + TIME_DEVIATION_SECS));
        assert!(nonces.record("n", 1001 + TIME_DEVIATION_SECS), "purged once outside the window");
    }
}
