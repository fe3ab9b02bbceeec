//! The identity service: the token response's `id` is
//! `<login host>/id/<18-char org id 00D…>/<18-char user id 005…>`, and `GET` on it with the
//! access token describes the user ("Identity URLs"; "OAuth 2.0 JWT bearer flow"). The sandbox
//! is its own login host, so the URL points at the simulator.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// The org's and the integration user's 15-character ids.
const ORG_ID_15: &str = "00D5g00000ELOSB";
const USER_ID_15: &str = "0055g00000ELOUS";

/// A 15-character Salesforce id with its 3-character case-safe suffix: one character per
/// 5-character chunk, encoding which of its characters are upper-case letters.
pub fn eighteen(id15: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ012345";
    let suffix: String = id15
        .as_bytes()
        .chunks(5)
        .map(|chunk| {
            let bits =
                chunk.iter().enumerate().filter(|(_, c)| c.is_ascii_uppercase()).fold(0, |acc, (i, _)| acc | (1 << i));
            ALPHABET[bits] as char
        })
        .collect();
    format!("{id15}{suffix}")
}

pub fn org_id() -> String {
    eighteen(ORG_ID_15)
}

pub fn user_id() -> String {
    eighteen(USER_ID_15)
}

/// The identity URL handed out with every token.
pub fn url(login_host: &str) -> String {
    format!("{login_host}/id/{}/{}", org_id(), user_id())
}

/// `GET /id/{org}/{user}`: 403 `Bad_OAuth_Token` without a live token, 404 for other ids.
pub fn serve(ids: &str, token_is_live: bool, instance_url: &str) -> Response {
    if !token_is_live {
        return (StatusCode::FORBIDDEN, "Bad_OAuth_Token").into_response();
    }
    if ids.trim_end_matches('/') != format!("{}/{}", org_id(), user_id()) {
        return (StatusCode::NOT_FOUND, "Bad_Id").into_response();
    }
    let rest = |path: &str| format!("{instance_url}/services/data/v{{version}}/{path}");
    let body = json!({
        "id": url(instance_url), "asserted_user": true, "user_id": user_id(), "organization_id": org_id(),
        "username": "integration@elo.example", "nick_name": "elo-integration", "display_name": "Elo Integration",
        "email": "integration@elo.example", "email_verified": true, "first_name": "Elo", "last_name": "Integration",
        "timezone": "America/Sao_Paulo", "active": true, "user_type": "STANDARD", "language": "en_US", "locale": "pt_BR",
        "utcOffset": -10_800_000, "last_modified_date": "2026-01-01T00:00:00.000+0000", "is_app_installed": true,
        "urls": {
            "rest": rest(""), "sobjects": rest("sobjects/"), "query": rest("query/"), "search": rest("search/"),
            "recent": rest("recent/"), "limits": rest("limits/"),
            "profile": format!("{instance_url}/{}", user_id()), "custom_domain": instance_url,
        },
    });
    crate::json_response(200, Some(&body), "application/json;charset=UTF-8", Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_safe_ids_match_salesforce_examples() {
        // Salesforce's documented pair: 001A0000006Vm9r -> 001A0000006Vm9rIAC.
        assert_eq!(eighteen("001A0000006Vm9r"), "001A0000006Vm9rIAC");
        assert_eq!(org_id().len(), 18);
        assert!(org_id().starts_with("00D") && user_id().starts_with("005"));
    }
}
