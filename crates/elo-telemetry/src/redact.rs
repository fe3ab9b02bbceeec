//! Personal data masking for log fields. Logs go to systems with wider access than the CRM,
//! so e-mails and phone numbers never appear in full.

/// `ana.souza@example.com` → `a***@example.com`; anything without `@` is fully masked.
pub fn email(value: &str) -> String {
    match value.trim().split_once('@') {
        Some((local, domain)) if !local.is_empty() => {
            let first: String = local.chars().take(1).collect();
            format!("{first}***@{domain}")
        }
        _ => "***".to_owned(),
    }
}

/// `+55 11 98765-4321` → `***21`: only the last two digits survive.
pub fn phone(value: &str) -> String {
    let digits: Vec<char> = value.chars().filter(char::is_ascii_digit).collect();
    if digits.len() < 6 {
        return "***".to_owned();
    }
    let tail: String = digits[digits.len() - 2..].iter().collect();
    format!("***{tail}")
}

/// Masks the value of secret-looking settings (`sasl.password`, `ssl.key.password`, tokens).
pub fn setting(key: &str, value: &str) -> String {
    let k = key.to_ascii_lowercase();
    if ["password", "secret", "token", "credential", "private"].iter().any(|w| k.contains(w))
        || k.ends_with(".key")
        || k.ends_with(".pem")
    {
        "***".to_owned()
    } else {
        value.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_personal_data() {
        assert_eq!(email("ana.souza@example.com"), "a***@example.com");
        assert_eq!(email("nonsense"), "***");
        assert_eq!(email("@x.com"), "***");
        assert_eq!(phone("+55 11 98765-4321"), "***21");
        assert_eq!(phone("12"), "***");
        assert!(!phone("+55 11 98765-4321").contains("98765"));
    }

    #[test]
    fn masks_secret_settings_only() {
        assert_eq!(setting("sasl.password", "hunter2"), "***");
        assert_eq!(setting("ssl.key.password", "x"), "***");
        assert_eq!(setting("ssl.key.pem", "x"), "***");
        assert_eq!(setting("bootstrap.servers", "b:9092"), "b:9092");
        assert_eq!(setting("sasl.username", "elo"), "elo");
    }
}
