//! Validation of request fields that are not secrets (emails, tenant names, ids).

/// Longest email accepted (RFC 5321 path limit).
pub const MAX_EMAIL_LEN: usize = 254;

/// Normalizes and checks an email: trimmed, lowercased, one `@` with a non-empty local part
/// and a dotted domain, no spaces or control characters.
pub fn normalize_email(raw: &str) -> Result<String, &'static str> {
    let email = raw.trim().to_lowercase();
    if email.is_empty() {
        return Err("email is required");
    }
    if email.len() > MAX_EMAIL_LEN {
        return Err("email must be at most 254 characters");
    }
    if email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("email must not contain spaces or control characters");
    }
    let Some((local, domain)) = email.split_once('@') else {
        return Err("email must look like name@example.com");
    };
    if local.is_empty()
        || domain.contains('@')
        || !domain.contains('.')
        || domain.starts_with('.')
        || domain.ends_with('.')
        || domain.contains("..")
    {
        return Err("email must look like name@example.com");
    }
    Ok(email)
}

/// Checks a tenant name: a DNS label of 3 to 40 characters (lowercase letters, digits,
/// '-'), starting with a letter and not ending with '-'. Kept short so that derived names
/// (the namespace `tenant-<name>`, service names) stay within the 63-character limit.
pub fn tenant_name(name: &str) -> Result<(), &'static str> {
    let len = name.len();
    if !(3..=40).contains(&len) {
        return Err("tenant_name must be 3 to 40 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("tenant_name may contain only lowercase letters, digits and '-'");
    }
    if !name.as_bytes()[0].is_ascii_lowercase() {
        return Err("tenant_name must start with a letter");
    }
    if name.ends_with('-') {
        return Err("tenant_name must not end with '-'");
    }
    Ok(())
}

/// Checks an id the server issued (a UUID); anything else cannot exist.
pub fn is_id(id: &str) -> bool {
    id.len() == 36 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalized_and_checked() {
        assert_eq!(
            normalize_email("  Alice@Example.COM "),
            Ok("alice@example.com".into())
        );
        for bad in [
            "",
            "alice",
            "@example.com",
            "alice@",
            "alice@example",
            "a b@example.com",
            "alice@@example.com",
            "alice@.example.com",
            "alice@example..com",
        ] {
            assert!(normalize_email(bad).is_err(), "{bad:?}");
        }
        assert!(normalize_email(&format!("{}@example.com", "a".repeat(250))).is_err());
    }

    #[test]
    fn tenant_names_are_dns_labels() {
        for good in ["acme", "acme-corp", "a12", "x-1-y"] {
            assert_eq!(tenant_name(good), Ok(()), "{good}");
        }
        for bad in [
            "ab",
            "Acme",
            "1acme",
            "acme-",
            "ac_me",
            "ac.me",
            "ácme",
            &"a".repeat(41),
        ] {
            assert!(tenant_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ids_are_uuids() {
        assert!(is_id("0b9c7a52-3a5e-4c1e-9a59-2f7c7ac9d8a1"));
        assert!(!is_id("../etc/passwd"));
        assert!(!is_id(""));
    }
}
