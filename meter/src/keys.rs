//! What a valid identifier looks like: catalog codes, tenant ids, idempotency keys.
//!
//! Identifiers end up in storage keys (and Redis hash tags later), so they are bounded in
//! length and restricted to characters that never need escaping.

/// Longest catalog code (metric, feature, plan, add-on, dimension name).
pub const MAX_CODE_LEN: usize = 64;
/// Longest tenant id.
pub const MAX_TENANT_LEN: usize = 128;
/// Longest idempotency key, event id or reservation id.
pub const MAX_KEY_LEN: usize = 256;

/// A catalog code: 1–64 characters from `A-Z a-z 0-9 _ - .`.
pub fn check_code(code: &str) -> Result<(), String> {
    check(code, MAX_CODE_LEN, |c| {
        c.is_ascii_alphanumeric() || "_-.".contains(c)
    })
}

/// A tenant id: 1–128 characters from `A-Z a-z 0-9 _ - . : @`.
pub fn check_tenant(tenant: &str) -> Result<(), String> {
    check(tenant, MAX_TENANT_LEN, |c| {
        c.is_ascii_alphanumeric() || "_-.:@".contains(c)
    })
}

/// An idempotency key, event id or reservation id: 1–256 printable ASCII characters
/// without spaces.
pub fn check_key(key: &str) -> Result<(), String> {
    check(key, MAX_KEY_LEN, |c| c.is_ascii_graphic())
}

fn check(s: &str, max: usize, ok: impl Fn(char) -> bool) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > max {
        return Err(format!(
            "is {} bytes long; at most {max} are allowed",
            s.len()
        ));
    }
    if let Some(c) = s.chars().find(|c| !ok(*c)) {
        return Err(format!(
            "contains the character {c:?}, which is not allowed"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_and_characters() {
        assert!(check_code("api_calls").is_ok());
        assert!(check_code("").unwrap_err().contains("empty"));
        assert!(check_code(&"a".repeat(65))
            .unwrap_err()
            .contains("at most 64"));
        assert!(check_code("a b").unwrap_err().contains("' '"));
        assert!(check_tenant("org:acme@eu").is_ok());
        assert!(check_tenant("acme/1").is_err());
        assert!(check_key(&"k".repeat(256)).is_ok());
        assert!(check_key(&"k".repeat(10_000)).is_err());
        assert!(check_key("naïve").is_err());
    }
}
