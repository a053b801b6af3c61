#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;

fn keys() -> (Identities, Recipients) {
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public();
    (
        Identities::from_one(identity),
        Recipients::from_one(recipient),
    )
}

fn header() -> Header {
    let mut detail = serde_json::Map::new();
    detail.insert("audit_head".into(), serde_json::json!({"sequence": 3}));
    Header {
        label: Label {
            kind: Kind::ControlDatabase,
            created_at: "2026-11-29T21:50:00Z".parse().unwrap(),
            tenant_id: None,
        },
        schema_version: 7,
        source: "sqlite".into(),
        detail,
    }
}

fn records() -> Vec<Vec<u8>> {
    (0..5000)
        .map(|i| format!("{{\"r\":[\"user-{i}\",{i},\"secret-payload-{i}\"]}}").into_bytes())
        .collect()
}

fn write(dir: &Path, recipients: &Recipients) -> PathBuf {
    let path = dir.join(file_name(&header().label));
    let mut writer = Writer::create(&path, &header(), recipients).unwrap();
    for r in records() {
        writer.write_record(&r).unwrap();
    }
    let summary = writer.finish().unwrap();
    assert_eq!(summary.records, 5000);
    assert_eq!(summary.path, path);
    path
}

fn read_all(path: &Path, identities: &Identities) -> Result<Vec<Vec<u8>>> {
    let mut reader = Reader::open(path, identities)?;
    let mut out = Vec::new();
    while let Some(r) = reader.next_record()? {
        out.push(r);
    }
    Ok(out)
}

#[test]
fn round_trip_and_nothing_readable_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (identities, recipients) = keys();
    let path = write(dir.path(), &recipients);
    assert_eq!(read_all(&path, &identities).unwrap(), records());
    let reader = Reader::open(&path, &identities).unwrap();
    assert_eq!(reader.header(), &header());
    assert_eq!(read_label(&path).unwrap(), header().label);
    let raw = std::fs::read(&path).unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(!text.contains("secret-payload"));
    assert!(!text.contains("user-1"));
    assert!(!text.contains("audit_head"), "the header is encrypted");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Nothing but the backup is left in the directory.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn several_recipients_each_open_it() {
    let dir = tempfile::tempdir().unwrap();
    let a = age::x25519::Identity::generate();
    let b = age::x25519::Identity::generate();
    let text = format!("# two\n{}\n\n{}\n", a.to_public(), b.to_public());
    let recipients = Recipients::parse(&text, "test").unwrap();
    let path = write(dir.path(), &recipients);
    assert_eq!(
        read_all(&path, &Identities::from_one(a)).unwrap().len(),
        5000
    );
    assert_eq!(
        read_all(&path, &Identities::from_one(b)).unwrap().len(),
        5000
    );
}

#[test]
fn wrong_identity_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (_, recipients) = keys();
    let path = write(dir.path(), &recipients);
    let (other, _) = keys();
    let err = Reader::open(&path, &other).err().unwrap();
    assert!(matches!(err, Error::WrongIdentity { .. }), "{err}");
    assert!(
        err.to_string().contains("none of the given identities"),
        "{err}"
    );
}

#[test]
fn truncation_anywhere_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (identities, recipients) = keys();
    let path = write(dir.path(), &recipients);
    let raw = std::fs::read(&path).unwrap();
    for cut in [raw.len() - 1, raw.len() - 17, raw.len() / 2, 200, 30] {
        std::fs::write(&path, &raw[..cut]).unwrap();
        let err = read_all(&path, &identities)
            .err()
            .unwrap_or_else(|| panic!("cut at {cut} read"));
        assert!(
            matches!(err, Error::Corrupt { .. } | Error::NotABackup { .. }),
            "cut at {cut}: {err}"
        );
    }
}

#[test]
fn a_flipped_byte_anywhere_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (identities, recipients) = keys();
    let path = write(dir.path(), &recipients);
    let raw = std::fs::read(&path).unwrap();
    let label_end = raw.iter().position(|b| *b == b'\n').unwrap();
    // Past the label: age's header, its MAC, the first chunk, the middle, the last byte.
    for at in [
        label_end + 20,
        label_end + 150,
        raw.len() / 2,
        raw.len() - 1,
    ] {
        let mut bad = raw.clone();
        bad[at] ^= 0x01;
        std::fs::write(&path, &bad).unwrap();
        let err = read_all(&path, &identities)
            .err()
            .unwrap_or_else(|| panic!("flip at {at} read"));
        assert!(
            matches!(err, Error::Corrupt { .. } | Error::WrongIdentity { .. }),
            "flip at {at}: {err}"
        );
    }
}

#[test]
fn a_changed_label_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (identities, recipients) = keys();
    let path = write(dir.path(), &recipients);
    let raw = std::fs::read(&path).unwrap();
    let text =
        String::from_utf8_lossy(&raw[..raw.iter().position(|b| *b == b'\n').unwrap()]).to_string();
    let changed = text.replace("2026-11-29T21:50:00Z", "2026-11-30T21:50:00Z");
    assert_ne!(text, changed);
    let mut bad = changed.into_bytes();
    bad.extend_from_slice(&raw[text.len()..]);
    std::fs::write(&path, &bad).unwrap();
    let err = Reader::open(&path, &identities).err().unwrap();
    assert!(err.to_string().contains("label was changed"), "{err}");
}

#[test]
fn a_writer_that_stops_early_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_, recipients) = keys();
    let path = dir.path().join("x.tbk");
    let mut writer = Writer::create(&path, &header(), &recipients).unwrap();
    writer.write_record(b"half").unwrap();
    drop(writer);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    // And an existing file is never overwritten.
    std::fs::write(&path, b"keep").unwrap();
    assert!(matches!(
        Writer::create(&path, &header(), &recipients),
        Err(Error::Exists(_))
    ));
    assert_eq!(std::fs::read(&path).unwrap(), b"keep");
}

#[test]
fn keys_generate_load_and_refuse_mistakes() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("backup.key");
    let public = dir.path().join("backup.pub");
    let recipient = keys::generate(&key, &public).unwrap();
    assert!(recipient.starts_with("age1"));
    let identities = Identities::load(&key).unwrap();
    let recipients = Recipients::load(&[&public]).unwrap();
    assert!(!format!("{identities:?}").contains("AGE-SECRET"));
    let path = write(dir.path(), &recipients);
    assert_eq!(read_all(&path, &identities).unwrap().len(), 5000);
    // Never overwritten.
    assert!(keys::generate(&key, &dir.path().join("other.pub")).is_err());
    // A private key given as a recipient, and a key others can read, are refused.
    let err = Recipients::load(&[&key]).unwrap_err();
    assert!(err.to_string().contains("private key"), "{err}");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = Identities::load(&key).unwrap_err();
    assert!(err.to_string().contains("other users"), "{err}");
    let err = Recipients::parse("age1nope\n", "f").unwrap_err();
    assert!(err.to_string().contains("f:1"), "{err}");
}

#[test]
fn list_sorts_by_time_and_prune_keeps_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let (_, recipients) = keys();
    for minute in [3, 1, 2] {
        let mut h = header();
        h.label.created_at = format!("2026-11-29T21:0{minute}:00Z").parse().unwrap();
        let path = dir.path().join(file_name(&h.label));
        Writer::create(&path, &h, &recipients)
            .unwrap()
            .finish()
            .unwrap();
    }
    std::fs::write(dir.path().join("notes.txt"), "not a backup").unwrap();
    let found = list(dir.path()).unwrap();
    let minutes: Vec<i8> = found
        .iter()
        .map(|f| {
            f.label
                .created_at
                .to_zoned(jiff::tz::TimeZone::UTC)
                .minute()
        })
        .collect();
    assert_eq!(minutes, [1, 2, 3]);
    let deleted = prune(dir.path(), Kind::ControlDatabase, None, 2).unwrap();
    assert_eq!(deleted, vec![found[0].path.clone()]);
    assert_eq!(list(dir.path()).unwrap().len(), 2);
    // Another kind is not touched.
    assert!(
        prune(dir.path(), Kind::TenantData, Some("acme"), 1)
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn async_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (identities, recipients) = keys();
    let path = dir.path().join("a.tbk");
    let mut writer = AsyncWriter::create(&path, header(), recipients)
        .await
        .unwrap();
    for r in records() {
        writer.write_record(r).await.unwrap();
    }
    assert_eq!(writer.finish().await.unwrap().records, 5000);
    let mut reader = AsyncReader::open(&path, identities).await.unwrap();
    assert_eq!(reader.header(), &header());
    let mut got = Vec::new();
    while let Some(r) = reader.next_record().await.unwrap() {
        got.push(r);
    }
    assert_eq!(got, records());
}
