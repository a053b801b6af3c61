//! The DNS records that make the API's mail unforgeable: SPF (who may send for the domain),
//! DKIM (the public key of the selector) and DMARC (what receivers do with mail that fails
//! both). Pure: `tenantry-api dns-records` prints them in zone-file syntax or as JSON.

use serde::Serialize;

/// What `dns-records` was asked for.
#[derive(Debug, Clone)]
pub struct RecordRequest {
    /// The mail domain (of `--mail-from`).
    pub domain: String,
    /// The DKIM selector.
    pub selector: String,
    /// The DKIM record's text (`v=DKIM1; k=…; p=…`).
    pub dkim: String,
    /// SPF `include:` mechanisms (the SMTP relay's domains).
    pub spf_include: Vec<String>,
    /// DMARC aggregate report addresses (`mailto:…`).
    pub dmarc_rua: Vec<String>,
    /// DMARC policy.
    pub dmarc_policy: DmarcPolicy,
}

/// DMARC `p=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DmarcPolicy {
    /// Report only.
    None,
    /// Deliver to spam.
    Quarantine,
    /// Refuse.
    Reject,
}

impl DmarcPolicy {
    fn as_str(self) -> &'static str {
        match self {
            DmarcPolicy::None => "none",
            DmarcPolicy::Quarantine => "quarantine",
            DmarcPolicy::Reject => "reject",
        }
    }
}

/// One TXT record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TxtRecord {
    /// `spf`, `dkim` or `dmarc`.
    pub kind: &'static str,
    /// Fully qualified owner name, without the final dot.
    pub name: String,
    /// Always `TXT`.
    #[serde(rename = "type")]
    pub record_type: &'static str,
    /// The record's text, before it is split into strings.
    pub value: String,
}

/// The three records.
pub fn records(r: &RecordRequest) -> Vec<TxtRecord> {
    let mut spf = String::from("v=spf1");
    for include in &r.spf_include {
        spf.push_str(" include:");
        spf.push_str(include);
    }
    // Nothing but the listed relays may send as this domain.
    spf.push_str(" -all");
    let mut dmarc = format!("v=DMARC1; p={}; adkim=s; aspf=s", r.dmarc_policy.as_str());
    if !r.dmarc_rua.is_empty() {
        dmarc.push_str("; rua=");
        dmarc.push_str(&r.dmarc_rua.join(","));
    }
    vec![
        TxtRecord {
            kind: "spf",
            name: r.domain.clone(),
            record_type: "TXT",
            value: spf,
        },
        TxtRecord {
            kind: "dkim",
            name: format!("{}._domainkey.{}", r.selector, r.domain),
            record_type: "TXT",
            value: r.dkim.clone(),
        },
        TxtRecord {
            kind: "dmarc",
            name: format!("_dmarc.{}", r.domain),
            record_type: "TXT",
            value: dmarc,
        },
    ]
}

/// A TXT value as zone-file character strings: quoted, at most 255 bytes each (an RSA key
/// is longer), space separated, inside parentheses when there are several.
pub fn zone_strings(value: &str) -> String {
    let parts: Vec<String> = value
        .as_bytes()
        .chunks(255)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect();
    if parts.len() == 1 {
        parts.concat()
    } else {
        format!("( {} )", parts.join(" "))
    }
}

/// The records in zone-file syntax, one per line.
pub fn zone_file(records: &[TxtRecord]) -> String {
    records
        .iter()
        .map(|r| format!("{}.\t3600\tIN\tTXT\t{}\n", r.name, zone_strings(&r.value)))
        .collect()
}

/// An SPF include or a DMARC address: no spaces, quotes, semicolons or commas that would
/// change the record's meaning.
pub fn parse_record_token(text: &str) -> Result<String, String> {
    let t = text.trim();
    if t.is_empty()
        || t.chars()
            .any(|c| c.is_whitespace() || matches!(c, '"' | ';' | ',' | '\\') || c.is_control())
    {
        return Err(format!("{text:?} cannot go into a DNS record"));
    }
    Ok(t.to_owned())
}

/// A DMARC report address: `mailto:` and an address.
pub fn parse_rua(text: &str) -> Result<String, String> {
    let t = parse_record_token(text)?;
    match t.strip_prefix("mailto:") {
        Some(addr) if addr.contains('@') => Ok(t),
        _ => Err(format!("{text:?} is not mailto:ADDRESS")),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn request() -> RecordRequest {
        RecordRequest {
            domain: "mail.example.com".into(),
            selector: "tenantry1".into(),
            dkim: "v=DKIM1; k=ed25519; p=AAAA".into(),
            spf_include: vec!["_spf.relay.example".into()],
            dmarc_rua: vec!["mailto:dmarc@example.com".into()],
            dmarc_policy: DmarcPolicy::Reject,
        }
    }

    #[test]
    fn the_three_records_have_their_names_and_defaults() {
        let rs = records(&request());
        assert_eq!(rs[0].name, "mail.example.com");
        assert_eq!(rs[0].value, "v=spf1 include:_spf.relay.example -all");
        assert_eq!(rs[1].name, "tenantry1._domainkey.mail.example.com");
        assert_eq!(rs[2].name, "_dmarc.mail.example.com");
        assert_eq!(
            rs[2].value,
            "v=DMARC1; p=reject; adkim=s; aspf=s; rua=mailto:dmarc@example.com"
        );
    }

    #[test]
    fn long_values_are_split_into_255_byte_strings() {
        let long = "p=".to_owned() + &"A".repeat(400);
        let z = zone_strings(&long);
        assert!(z.starts_with("( \""));
        let joined: String = z
            .trim_matches(|c| c == '(' || c == ')' || c == ' ')
            .split("\" \"")
            .map(|p| p.trim_matches('"'))
            .collect();
        assert_eq!(joined, long);
        assert_eq!(zone_strings("v=spf1 -all"), "\"v=spf1 -all\"");
    }

    #[test]
    fn record_tokens_refuse_what_would_change_the_record() {
        assert!(parse_record_token("_spf.google.com").is_ok());
        for bad in ["a b", "x;y", "\"q\"", ""] {
            assert!(parse_record_token(bad).is_err(), "{bad:?}");
        }
        assert!(parse_rua("mailto:d@example.com").is_ok());
        assert!(parse_rua("d@example.com").is_err());
    }
}
