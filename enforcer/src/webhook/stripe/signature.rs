//! Stripe's webhook signature: the `Stripe-Signature` header `t=<unix seconds>,v1=<hex>`
//! (more `v1` entries while a secret is being rolled, other schemes ignored) holds
//! HMAC-SHA256 of `"{t}.{raw body}"` keyed with the endpoint's signing secret.
//!
//! The signature is checked before the timestamp, so "outside the tolerance" always
//! means "authentic, but too old or too far ahead": a replay, or a clock that drifted.
//! The window applies in both directions; Stripe's own libraries only refuse old ones,
//! but a timestamp from the future is no more trustworthy.

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;

/// How far the signed timestamp may be from `now` when nothing else is configured:
/// Stripe's recommended 5 minutes.
pub const DEFAULT_TOLERANCE_SECS: u64 = 300;

/// Why a delivery was refused. Nothing in it was applied.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SignatureError {
    /// The header is not `t=…,v1=…`.
    #[error("Stripe-Signature: {reason}")]
    Malformed {
        /// What is wrong with it.
        reason: String,
    },
    /// The header has a timestamp but no `v1` signature.
    #[error("Stripe-Signature: no v1 signature (only v1, HMAC-SHA256, is accepted)")]
    NoSignature,
    /// No `v1` signature matches the body and the signing secret.
    #[error("Stripe-Signature: no v1 signature matches the body and the signing secret (wrong secret, or the body was changed: sign the raw bytes, not re-encoded JSON)")]
    Mismatch,
    /// Authentic, but signed too long before or after `now`.
    #[error("Stripe-Signature: signed at {signed_at}, {skew_secs} s from now ({now}); at most {tolerance_secs} s either way are accepted (a replay, or a clock off)")]
    OutsideTolerance {
        /// The signed timestamp.
        signed_at: DateTime<Utc>,
        /// The receiver's time.
        now: DateTime<Utc>,
        /// `|now − signed_at|`, seconds.
        skew_secs: u64,
        /// The accepted window, seconds.
        tolerance_secs: u64,
    },
}

/// Checks `header` against the raw `payload` and `secret` at `now`; returns the signed
/// instant. Comparison is constant-time (`hmac`'s `verify_slice`).
pub fn verify(
    header: &str,
    payload: &[u8],
    secret: &[u8],
    tolerance_secs: u64,
    now: DateTime<Utc>,
) -> Result<DateTime<Utc>, SignatureError> {
    let malformed = |reason: &str| SignatureError::Malformed {
        reason: reason.to_string(),
    };
    let mut timestamp: Option<&str> = None;
    let mut signatures: Vec<&str> = Vec::new();
    for part in header.split(',') {
        let (key, value) = part
            .trim()
            .split_once('=')
            .ok_or_else(|| malformed("every entry must be key=value"))?;
        match key {
            "t" if timestamp.is_some() => return Err(malformed("t= appears twice")),
            "t" => timestamp = Some(value),
            "v1" => signatures.push(value),
            // v0 (test-mode legacy) and future schemes are not ours to trust.
            _ => {}
        }
    }
    let t = timestamp.ok_or_else(|| malformed("no t= timestamp"))?;
    let secs: i64 = t
        .parse()
        .map_err(|_| malformed("t= is not a Unix time in seconds"))?;
    let signed_at =
        DateTime::from_timestamp(secs, 0).ok_or_else(|| malformed("t= is out of range"))?;
    if signatures.is_empty() {
        return Err(SignatureError::NoSignature);
    }

    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    // Stripe signs the timestamp exactly as it sent it.
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(payload);
    let matched = signatures
        .iter()
        .filter_map(|s| decode_hex(s))
        .any(|sig| mac.clone().verify_slice(&sig).is_ok());
    if !matched {
        return Err(SignatureError::Mismatch);
    }

    let skew_secs = (now - signed_at).num_seconds().unsigned_abs();
    if skew_secs > tolerance_secs {
        return Err(SignatureError::OutsideTolerance {
            signed_at,
            now,
            skew_secs,
            tolerance_secs,
        });
    }
    Ok(signed_at)
}

/// The `Stripe-Signature` header for `payload` signed with `secret` at `t`, as Stripe
/// would send it: for tests, and for replaying recorded deliveries.
pub fn sign(payload: &[u8], secret: &[u8], t: i64) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(payload);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("t={t},v1={hex}")
}

/// Lower- or upper-case hex of a SHA-256 (64 digits); anything else cannot match.
fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() != 64 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"whsec_test_secret";
    const BODY: &[u8] = br#"{"id":"evt_1","type":"invoice.paid"}"#;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(secs, 0).unwrap()
    }

    #[test]
    fn a_signed_body_verifies_within_the_window_both_ways() {
        let h = sign(BODY, SECRET, 1_700_000_000);
        assert_eq!(
            verify(&h, BODY, SECRET, 300, at(1_700_000_000)),
            Ok(at(1_700_000_000))
        );
        assert!(verify(&h, BODY, SECRET, 300, at(1_700_000_300)).is_ok());
        assert!(verify(&h, BODY, SECRET, 300, at(1_699_999_700)).is_ok());
        let late = verify(&h, BODY, SECRET, 300, at(1_700_000_301)).unwrap_err();
        assert!(
            matches!(
                late,
                SignatureError::OutsideTolerance { skew_secs: 301, .. }
            ),
            "{late}"
        );
        let early = verify(&h, BODY, SECRET, 300, at(1_699_999_699)).unwrap_err();
        assert!(
            matches!(
                early,
                SignatureError::OutsideTolerance { skew_secs: 301, .. }
            ),
            "{early}"
        );
    }

    #[test]
    fn any_of_several_v1_signatures_may_match_and_other_schemes_are_ignored() {
        let good = sign(BODY, SECRET, 1_700_000_000);
        let good_sig = good.split_once(",v1=").unwrap().1;
        let other = sign(BODY, b"whsec_old", 1_700_000_000);
        let other_sig = other.split_once(",v1=").unwrap().1;
        let h = format!(
            "t=1700000000, v0={good_sig}, v1={other_sig}, v1={}",
            good_sig.to_uppercase()
        );
        assert!(verify(&h, BODY, SECRET, 300, at(1_700_000_000)).is_ok());
        // A v0 entry with the right digest is not a v1 signature.
        let h = format!("t=1700000000,v0={good_sig}");
        assert_eq!(
            verify(&h, BODY, SECRET, 300, at(1_700_000_000)),
            Err(SignatureError::NoSignature)
        );
    }

    #[test]
    fn a_changed_body_a_wrong_secret_or_a_bad_header_is_refused() {
        let h = sign(BODY, SECRET, 1_700_000_000);
        let now = at(1_700_000_000);
        assert_eq!(
            verify(&h, b"{}", SECRET, 300, now),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(&h, BODY, b"whsec_other", 300, now),
            Err(SignatureError::Mismatch)
        );
        // The timestamp is part of what is signed.
        let moved = h.replace("t=1700000000", "t=1700000001");
        assert_eq!(
            verify(&moved, BODY, SECRET, 300, now),
            Err(SignatureError::Mismatch)
        );
        for (header, why) in [
            ("", "key=value"),
            ("v1=00", "no t="),
            ("t=soon,v1=00", "Unix time"),
            ("t=1,t=2,v1=00", "twice"),
        ] {
            let e = verify(header, BODY, SECRET, 300, now).unwrap_err();
            assert!(e.to_string().contains(why), "{header:?}: {e}");
        }
    }

    #[test]
    fn outside_the_window_is_refused_only_once_the_signature_is_good() {
        let h = sign(BODY, b"whsec_other", 1_000);
        assert_eq!(
            verify(&h, BODY, SECRET, 300, at(1_700_000_000)),
            Err(SignatureError::Mismatch)
        );
    }
}
