//! Tenantry's backup file, shared by the control database's backups (`tenantry-api
//! backup`) and a tenant instance's (`tenant-runtime backup`).
//!
//! A backup file is
//!
//! 1. one cleartext line, `tenantry-backup/1 {label}`: the [`Label`] (kind, time, tenant),
//!    so that backups can be listed and aged without the key; nothing secret;
//! 2. an [age](https://age-encryption.org/v1) stream encrypted to one or more X25519
//!    recipients (`age`/`rage` can decrypt it), whose plaintext is
//! 3. an LZ4 frame of length-prefixed frames: the [`Header`] (which repeats the label, so a
//!    changed label is refused), the records, and a trailer with the number of records and
//!    the SHA-256 over them.
//!
//! age authenticates every 64 KiB chunk and the end of the stream, so a flipped byte or a
//! truncated file is refused; the trailer's count and checksum also catch a writer that
//! stopped early, and are checked before a reader reports the end. Readers see records as
//! they are decrypted: a restore keeps what it writes uncommitted until
//! [`Reader::next_record`] has answered `None`.
//!
//! Files are written to a temporary name in the target directory (mode 0600) and renamed
//! into place once complete and synced: a crash never leaves a partial file under the
//! final name.

mod bridge;
mod error;
pub mod keys;

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use bridge::{AsyncReader, AsyncWriter};
pub use error::{Error, Result};
pub use keys::{Identities, Recipients};

/// The first bytes of every backup file.
pub const MAGIC: &str = "tenantry-backup/1 ";
/// The file name extension of backups.
pub const EXTENSION: &str = "tbk";
/// Longest cleartext label line accepted.
const MAX_LABEL_LINE: u64 = 16 * 1024;
/// Largest single frame (header, record or trailer) accepted: 64 MiB.
const MAX_FRAME: u32 = 64 * 1024 * 1024;

const TAG_HEADER: u8 = b'H';
const TAG_RECORD: u8 = b'R';
const TAG_TRAILER: u8 = b'E';

/// What a backup holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// The control API's database (`tenantry-api backup`).
    ControlDatabase,
    /// One tenant instance's store (`tenant-runtime backup`).
    TenantData,
}

impl Kind {
    /// The name used in labels, file names and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::ControlDatabase => "control-database",
            Kind::TenantData => "tenant-data",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The cleartext part of a backup: enough to list and age backups without the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Label {
    /// What it holds.
    pub kind: Kind,
    /// When its snapshot was taken.
    pub created_at: jiff::Timestamp,
    /// The tenant, for [`Kind::TenantData`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
}

/// The encrypted header: the label again, the schema version of the data, and what the
/// kind of backup adds (the control database's audit chain head, …).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// Must equal the cleartext label.
    pub label: Label,
    /// Schema version of the records.
    pub schema_version: i64,
    /// Where the snapshot came from (`sqlite`, `postgres`).
    pub source: String,
    /// Kind-specific details.
    #[serde(default)]
    pub detail: serde_json::Map<String, serde_json::Value>,
}

/// What [`Writer::finish`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// The backup file.
    pub path: PathBuf,
    /// Records written.
    pub records: u64,
    /// Bytes of records (before compression and encryption).
    pub record_bytes: u64,
    /// Bytes of the file.
    pub file_bytes: u64,
    /// SHA-256 over the records (each length-prefixed), hex.
    pub sha256: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Trailer {
    records: u64,
    record_bytes: u64,
    sha256: String,
}

/// Reads the cleartext label of a backup file (no key needed).
pub fn read_label(path: &Path) -> Result<Label> {
    let file = File::open(path).map_err(Error::io(format!("opening {}", path.display())))?;
    let mut reader = BufReader::new(file);
    Ok(read_label_line(&mut reader, path)?.0)
}

fn read_label_line(reader: &mut impl BufRead, path: &Path) -> Result<(Label, Vec<u8>)> {
    let mut line = Vec::new();
    reader
        .take(MAX_LABEL_LINE)
        .read_until(b'\n', &mut line)
        .map_err(Error::io(format!("reading {}", path.display())))?;
    let not_a_backup = || Error::NotABackup {
        path: path.to_owned(),
    };
    let json = line
        .strip_suffix(b"\n")
        .and_then(|l| l.strip_prefix(MAGIC.as_bytes()))
        .ok_or_else(not_a_backup)?;
    let label: Label = serde_json::from_slice(json).map_err(|_| not_a_backup())?;
    Ok((label, json.to_vec()))
}

fn frame_header(tag: u8, len: usize) -> Result<[u8; 5]> {
    let len = u32::try_from(len)
        .ok()
        .filter(|l| *l <= MAX_FRAME)
        .ok_or(Error::TooLarge)?;
    let mut out = [tag, 0, 0, 0, 0];
    out[1..].copy_from_slice(&len.to_be_bytes());
    Ok(out)
}

type Sink = lz4_flex::frame::FrameEncoder<age::stream::StreamWriter<BufWriter<File>>>;

/// Writes one backup file; [`Writer::finish`] makes it appear under its name. Dropped
/// without `finish`, it removes its temporary file.
pub struct Writer {
    sink: Option<Sink>,
    temp: PathBuf,
    path: PathBuf,
    hasher: Sha256,
    records: u64,
    record_bytes: u64,
}

impl Writer {
    /// Starts `path` (which must not exist) for `header`, encrypted to every recipient.
    pub fn create(path: &Path, header: &Header, recipients: &Recipients) -> Result<Writer> {
        use std::os::unix::fs::OpenOptionsExt as _;
        if path.exists() {
            return Err(Error::Exists(path.to_owned()));
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| Error::NotABackup {
                path: path.to_owned(),
            })?;
        let temp = dir.join(format!(
            ".{name}.partial-{}-{}",
            std::process::id(),
            jiff::Timestamp::now().as_nanosecond()
        ));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .map_err(Error::io(format!("creating {}", temp.display())))?;
        let mut writer = Writer {
            sink: None,
            temp,
            path: path.to_owned(),
            hasher: Sha256::new(),
            records: 0,
            record_bytes: 0,
        };
        let mut out = BufWriter::with_capacity(256 * 1024, file);
        let label = serde_json::to_vec(&header.label).map_err(Error::encode)?;
        out.write_all(MAGIC.as_bytes())
            .and_then(|()| out.write_all(&label))
            .and_then(|()| out.write_all(b"\n"))
            .map_err(writer.io_err())?;
        let encryptor = age::Encryptor::with_recipients(recipients.iter())
            .map_err(|e| Error::Encrypt(e.to_string()))?;
        let stream = encryptor.wrap_output(out).map_err(writer.io_err())?;
        writer.sink = Some(lz4_flex::frame::FrameEncoder::new(stream));
        let header = serde_json::to_vec(header).map_err(Error::encode)?;
        writer.frame(TAG_HEADER, &header)?;
        Ok(writer)
    }

    fn io_err(&self) -> impl Fn(std::io::Error) -> Error + use<> {
        let what = format!("writing {}", self.temp.display());
        move |source| Error::Io {
            what: what.clone(),
            source,
        }
    }

    fn frame(&mut self, tag: u8, bytes: &[u8]) -> Result<()> {
        let head = frame_header(tag, bytes.len())?;
        let err = self.io_err();
        let sink = self.sink.as_mut().ok_or(Error::Finished)?;
        sink.write_all(&head)
            .and_then(|()| sink.write_all(bytes))
            .map_err(err)
    }

    /// Appends one record.
    pub fn write_record(&mut self, record: &[u8]) -> Result<()> {
        self.frame(TAG_RECORD, record)?;
        self.hasher.update((record.len() as u64).to_be_bytes());
        self.hasher.update(record);
        self.records += 1;
        self.record_bytes += record.len() as u64;
        Ok(())
    }

    /// Writes the trailer, finishes the compression and encryption, syncs the file and
    /// renames it into place.
    pub fn finish(mut self) -> Result<Summary> {
        let sha256 = hex::encode(std::mem::take(&mut self.hasher).finalize());
        let trailer = Trailer {
            records: self.records,
            record_bytes: self.record_bytes,
            sha256: sha256.clone(),
        };
        let trailer = serde_json::to_vec(&trailer).map_err(Error::encode)?;
        self.frame(TAG_TRAILER, &trailer)?;
        let err = self.io_err();
        let sink = self.sink.take().ok_or(Error::Finished)?;
        let stream = sink.finish().map_err(|e| err(std::io::Error::other(e)))?;
        let out = stream.finish().map_err(&err)?;
        let file = out.into_inner().map_err(|e| err(e.into_error()))?;
        file.sync_all().map_err(&err)?;
        let file_bytes = file.metadata().map_err(&err)?.len();
        drop(file);
        if self.path.exists() {
            return Err(Error::Exists(self.path.clone()));
        }
        std::fs::rename(&self.temp, &self.path)
            .map_err(Error::io(format!("renaming to {}", self.path.display())))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(Error::io(format!("syncing {}", dir.display())))?;
        }
        Ok(Summary {
            path: self.path.clone(),
            records: self.records,
            record_bytes: self.record_bytes,
            file_bytes,
            sha256,
        })
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Unfinished (an error, or the caller gave up): leave nothing behind.
        if self.sink.is_some() || self.temp.exists() {
            drop(self.sink.take());
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

type Source = BufReader<lz4_flex::frame::FrameDecoder<age::stream::StreamReader<BufReader<File>>>>;

/// Reads one backup file's records in order; the last `next_record` (`None`) checks the
/// trailer.
pub struct Reader {
    source: Source,
    path: PathBuf,
    header: Header,
    hasher: Sha256,
    records: u64,
    record_bytes: u64,
    done: bool,
}

impl Reader {
    /// Opens `path` with the identities; checks that one of them opens it and that the
    /// encrypted header repeats the label.
    pub fn open(path: &Path, identities: &Identities) -> Result<Reader> {
        let file = File::open(path).map_err(Error::io(format!("opening {}", path.display())))?;
        let mut input = BufReader::with_capacity(256 * 1024, file);
        let (label, _) = read_label_line(&mut input, path)?;
        let decryptor = age::Decryptor::new_buffered(input).map_err(|e| Error::decrypt(path, e))?;
        let stream = decryptor
            .decrypt(identities.iter())
            .map_err(|e| Error::decrypt(path, e))?;
        let source =
            BufReader::with_capacity(256 * 1024, lz4_flex::frame::FrameDecoder::new(stream));
        let mut reader = Reader {
            source,
            path: path.to_owned(),
            header: Header {
                label: label.clone(),
                schema_version: 0,
                source: String::new(),
                detail: Default::default(),
            },
            hasher: Sha256::new(),
            records: 0,
            record_bytes: 0,
            done: false,
        };
        let (tag, bytes) = reader.frame()?.ok_or_else(|| reader.corrupt("no header"))?;
        if tag != TAG_HEADER {
            return Err(reader.corrupt("no header"));
        }
        let header: Header =
            serde_json::from_slice(&bytes).map_err(|_| reader.corrupt("unreadable header"))?;
        if header.label != label {
            return Err(reader.corrupt(
                "the cleartext label does not match the encrypted header (the label was changed)",
            ));
        }
        reader.header = header;
        Ok(reader)
    }

    /// The encrypted header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    fn corrupt(&self, what: &str) -> Error {
        Error::Corrupt {
            path: self.path.clone(),
            detail: what.to_owned(),
        }
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<bool> {
        match self.source.read_exact(buf) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
            Err(e) => Err(Error::Corrupt {
                path: self.path.clone(),
                detail: e.to_string(),
            }),
        }
    }

    fn frame(&mut self) -> Result<Option<(u8, Vec<u8>)>> {
        let mut head = [0u8; 5];
        if !self.read_exact(&mut head)? {
            return Ok(None);
        }
        let mut len = [0u8; 4];
        len.copy_from_slice(&head[1..]);
        let len = u32::from_be_bytes(len);
        if len > MAX_FRAME {
            return Err(self.corrupt("a frame is larger than any writer makes"));
        }
        let mut bytes = vec![0u8; len as usize];
        if !self.read_exact(&mut bytes)? {
            return Err(self.corrupt("the file ends inside a record (truncated)"));
        }
        Ok(Some((head[0], bytes)))
    }

    /// The next record, or `None` at the end once the trailer's count and checksum match
    /// and nothing follows it.
    pub fn next_record(&mut self) -> Result<Option<Vec<u8>>> {
        if self.done {
            return Ok(None);
        }
        let Some((tag, bytes)) = self.frame()? else {
            return Err(self.corrupt("the file ends before its trailer (truncated)"));
        };
        match tag {
            TAG_RECORD => {
                self.hasher.update((bytes.len() as u64).to_be_bytes());
                self.hasher.update(&bytes);
                self.records += 1;
                self.record_bytes += bytes.len() as u64;
                Ok(Some(bytes))
            }
            TAG_TRAILER => {
                let trailer: Trailer = serde_json::from_slice(&bytes)
                    .map_err(|_| self.corrupt("unreadable trailer"))?;
                let sha256 = hex::encode(std::mem::take(&mut self.hasher).finalize());
                if trailer.records != self.records
                    || trailer.record_bytes != self.record_bytes
                    || trailer.sha256 != sha256
                {
                    return Err(self.corrupt("the records do not match the trailer's checksum"));
                }
                let mut rest = [0u8; 1];
                if self.read_exact(&mut rest)? {
                    return Err(self.corrupt("data follows the trailer"));
                }
                self.done = true;
                Ok(None)
            }
            _ => Err(self.corrupt("unknown frame")),
        }
    }
}

/// The file name of a backup of `kind` taken at `at`: `<kind>-<UTC time>.tbk`
/// (`tenant-data-acme-20261129T215000Z.tbk` with a tenant), which sorts by time.
pub fn file_name(label: &Label) -> String {
    let at = label.created_at.strftime("%Y%m%dT%H%M%S%.3fZ");
    match &label.tenant_id {
        Some(tenant) => format!("{}-{tenant}-{at}.{EXTENSION}", label.kind),
        None => format!("{}-{at}.{EXTENSION}", label.kind),
    }
}

/// One backup found by [`list`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Found {
    /// The file.
    pub path: PathBuf,
    /// Its label.
    pub label: Label,
    /// Its size.
    pub bytes: u64,
}

/// Every backup file in `dir` (not its subdirectories), oldest first; files that are not
/// backups (or partial ones) are skipped.
pub fn list(dir: &Path) -> Result<Vec<Found>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("listing {}", dir.display()))(e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(Error::io(format!("listing {}", dir.display())))?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || !name.ends_with(&format!(".{EXTENSION}")) {
            continue;
        }
        let Ok(label) = read_label(&path) else {
            continue;
        };
        let bytes = entry.metadata().map(|m| m.len()).unwrap_or(0);
        found.push(Found { path, label, bytes });
    }
    found.sort_by(|a, b| (a.label.created_at, &a.path).cmp(&(b.label.created_at, &b.path)));
    Ok(found)
}

/// Deletes the oldest backups of `kind` (and tenant) in `dir` beyond the newest `keep`;
/// returns the paths deleted. Partial files older than an hour are removed too.
pub fn prune(dir: &Path, kind: Kind, tenant_id: Option<&str>, keep: usize) -> Result<Vec<PathBuf>> {
    let mine: Vec<Found> = list(dir)?
        .into_iter()
        .filter(|f| f.label.kind == kind && f.label.tenant_id.as_deref() == tenant_id)
        .collect();
    let excess = mine.len().saturating_sub(keep.max(1));
    let mut deleted = Vec::new();
    for found in mine.into_iter().take(excess) {
        std::fs::remove_file(&found.path)
            .map_err(Error::io(format!("deleting {}", found.path.display())))?;
        deleted.push(found.path);
    }
    // A writer that crashed left its temporary file: gone after an hour.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > std::time::Duration::from_secs(3600));
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if stale && name.starts_with('.') && name.contains(".partial-") {
                let _ = std::fs::remove_file(entry.path());
                deleted.push(entry.path());
            }
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests;
