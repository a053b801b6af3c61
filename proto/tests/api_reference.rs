//! `docs/api-reference.md` is generated from the comments in `proto/tenantry/v1/*.proto`:
//! this test compiles the files with protox (keeping source info, which carries the
//! comments), renders every service, rpc, message, field and enum as markdown, and fails
//! when the committed file differs. `TENANTRY_BLESS=1` writes the file instead:
//!
//! ```sh
//! TENANTRY_BLESS=1 cargo test -p tenantry-proto --test api_reference
//! ```
//!
//! The rendering is deterministic: files in name order, everything else in declaration
//! order, no timestamps. The other tests keep the reference and the hand-written docs
//! honest: every element of the contract has a comment, every link in the reference lands
//! on a heading, every `ErrorInfo` reason the API returns is documented, and every source
//! file, item and test that `docs/*.md` cite exists.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{
    DescriptorProto, EnumDescriptorProto, FieldDescriptorProto, FileDescriptorProto,
    FileDescriptorSet, ServiceDescriptorProto,
};

/// The package the reference documents.
const PACKAGE: &str = "tenantry.v1";
/// Where its files are, relative to this crate.
const PROTO_DIR: &str = "tenantry/v1";
/// The generated file, relative to the repository root.
const OUTPUT: &str = "docs/api-reference.md";
/// The command that regenerates [`OUTPUT`].
const BLESS: &str = "TENANTRY_BLESS=1 cargo test -p tenantry-proto --test api_reference";

// Field numbers in `descriptor.proto`, which make up `SourceCodeInfo` paths.
const FILE_PACKAGE: i32 = 2;
const FILE_MESSAGE: i32 = 4;
const FILE_ENUM: i32 = 5;
const FILE_SERVICE: i32 = 6;
const FILE_SYNTAX: i32 = 12;
const MESSAGE_FIELD: i32 = 2;
const MESSAGE_NESTED: i32 = 3;
const MESSAGE_ENUM: i32 = 4;
const MESSAGE_ONEOF: i32 = 8;
const ENUM_VALUE: i32 = 2;
const SERVICE_METHOD: i32 = 2;

/// What the reference says before the generated part.
const PREAMBLE: &str = "\
The gRPC contract of the Tenantry control API: package `tenantry.v1`, defined in
[`proto/tenantry/v1/`](../proto/tenantry/v1/). `tenantry-api` serves it on port 50051
(`--listen`, default `127.0.0.1:50051`), next to `grpc.health.v1.Health` and server
reflection (v1 and v1alpha).

- **Authentication.** `AccountService.Signup` and `AccountService.Login` need no
  credentials. Every other rpc needs the metadata `authorization: Bearer <session_token>`
  with the token from `Login`. A session ends after its idle timeout (default 30 min), at
  its absolute timeout (default 12 h), on `Logout`, on a password change and when an admin
  revokes it.
- **Admin rpcs** (`AdminService`) also need the `admin` role and a second factor verified
  on the calling session within the step-up window (default 15 min); see
  `MfaService.VerifyMfa`.
- **Errors** are gRPC status codes with rich details (`google.rpc.ErrorInfo` with domain
  `tenantry.dev`, `BadRequest` field violations, `RetryInfo`); the codes, reasons and what
  a client should do about each are in [errors.md](errors.md).
- **Tenant isolation.** A tenant the caller is not a member of answers `NOT_FOUND`,
  exactly like one that does not exist.
- Timestamps are `google.protobuf.Timestamp` (UTC). Fields follow proto3 rules: an unset
  scalar reads as its zero value.
";

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn repo_root() -> PathBuf {
    crate_dir()
        .parent()
        .expect("the crate lives in the workspace")
        .to_path_buf()
}

/// Compiles every `.proto` file of [`PROTO_DIR`] with source info (protox keeps it).
fn compile() -> FileDescriptorSet {
    let dir = crate_dir().join(PROTO_DIR);
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".proto"))
        .map(|name| format!("{PROTO_DIR}/{name}"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .proto files in {}", dir.display());
    protox::compile(&files, [crate_dir()]).unwrap_or_else(|e| panic!("protox: {e}"))
}

/// The files of [`PACKAGE`], in name order.
fn package_files(set: &FileDescriptorSet) -> Vec<&FileDescriptorProto> {
    let mut files: Vec<&FileDescriptorProto> =
        set.file.iter().filter(|f| f.package() == PACKAGE).collect();
    files.sort_by(|a, b| a.name().cmp(b.name()));
    files
}

/// The comments of one file by `SourceCodeInfo` path: the leading comment, else the
/// trailing one, normalized (common indentation removed, blank edges trimmed).
struct Comments {
    by_path: HashMap<Vec<i32>, String>,
    detached: HashMap<Vec<i32>, Vec<String>>,
}

impl Comments {
    fn of(file: &FileDescriptorProto) -> Comments {
        let mut by_path = HashMap::new();
        let mut detached = HashMap::new();
        for loc in file
            .source_code_info
            .iter()
            .flat_map(|info| info.location.iter())
        {
            let text = loc
                .leading_comments
                .as_deref()
                .map(normalize)
                .filter(|t| !t.is_empty())
                .or_else(|| {
                    loc.trailing_comments
                        .as_deref()
                        .map(normalize)
                        .filter(|t| !t.is_empty())
                });
            if let Some(text) = text {
                by_path.insert(loc.path.clone(), text);
            }
            if !loc.leading_detached_comments.is_empty() {
                detached.insert(
                    loc.path.clone(),
                    loc.leading_detached_comments
                        .iter()
                        .map(|c| normalize(c))
                        .collect(),
                );
            }
        }
        Comments { by_path, detached }
    }

    fn get(&self, path: &[i32]) -> Option<&str> {
        self.by_path.get(path).map(String::as_str)
    }

    /// The comment at the top of the file: the one attached to `syntax` (or, failing
    /// that, to `package`), or the detached comments before either.
    fn file_comment(&self) -> Option<String> {
        for path in [[FILE_SYNTAX], [FILE_PACKAGE]] {
            if let Some(text) = self.get(&path) {
                return Some(text.to_owned());
            }
        }
        for path in [[FILE_SYNTAX], [FILE_PACKAGE]] {
            if let Some(parts) = self.detached.get(&path[..]) {
                let text = parts.join("\n\n");
                if !text.trim().is_empty() {
                    return Some(text);
                }
            }
        }
        None
    }
}

/// Removes the indentation every line shares and blank lines at either end.
fn normalize(raw: &str) -> String {
    let lines: Vec<&str> = raw.lines().map(str::trim_end).collect();
    let indent = lines
        .iter()
        .filter(|l| !l.is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    let lines: Vec<&str> = lines
        .iter()
        .map(|l| if l.is_empty() { "" } else { &l[indent..] })
        .collect();
    let start = lines.iter().position(|l| !l.is_empty()).unwrap_or(0);
    let end = lines
        .iter()
        .rposition(|l| !l.is_empty())
        .map_or(0, |i| i + 1);
    lines[start..end.max(start)].join("\n")
}

/// Escapes what markdown would otherwise swallow: `<` and `>` outside code spans become
/// entities, so `<session_token>` is not taken for an HTML tag.
fn escape_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_code = false;
    for c in text.chars() {
        match c {
            '`' => {
                in_code = !in_code;
                out.push(c);
            }
            '<' if !in_code => out.push_str("&lt;"),
            '>' if !in_code => out.push_str("&gt;"),
            _ => out.push(c),
        }
    }
    out
}

/// A comment as one table cell: lines joined with spaces, pipes escaped (in code spans
/// too, as GitHub's tables require).
fn cell(text: &str) -> String {
    let joined = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    escape_text(&joined).replace('|', "\\|")
}

/// A comment as a paragraph block, or a note that there is none.
fn block(text: Option<&str>) -> String {
    match text {
        Some(t) => escape_text(t),
        None => "_No description._".to_owned(),
    }
}

/// The anchor GitHub gives a heading: lowercase, spaces to `-`, punctuation other than
/// `-` and `_` dropped.
fn slug(heading: &str) -> String {
    heading
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_ascii_alphanumeric() => Some(c.to_ascii_lowercase()),
            '-' | '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// `Outer.Inner` for a type of this package, from its full name `.tenantry.v1.Outer.Inner`.
fn local_name(full: &str) -> Option<&str> {
    full.strip_prefix('.')?
        .strip_prefix(PACKAGE)?
        .strip_prefix('.')
}

/// Every message of the set by full name (`.pkg.Outer.Inner`), to resolve map entries.
fn index_messages(set: &FileDescriptorSet) -> HashMap<String, &DescriptorProto> {
    fn walk<'a>(
        prefix: &str,
        messages: &'a [DescriptorProto],
        out: &mut HashMap<String, &'a DescriptorProto>,
    ) {
        for m in messages {
            let full = format!("{prefix}.{}", m.name());
            walk(&full, &m.nested_type, out);
            out.insert(full, m);
        }
    }
    let mut out = HashMap::new();
    for file in &set.file {
        let prefix = if file.package().is_empty() {
            String::new()
        } else {
            format!(".{}", file.package())
        };
        walk(&prefix, &file.message_type, &mut out);
    }
    out
}

/// A message or enum type as the reference shows it: a link for this package's types,
/// the full name for others.
fn type_ref(full: &str) -> String {
    match local_name(full) {
        Some(local) => format!("[`{local}`](#{})", slug(local)),
        None => format!("`{}`", full.trim_start_matches('.')),
    }
}

fn scalar_name(t: Type) -> &'static str {
    match t {
        Type::Double => "double",
        Type::Float => "float",
        Type::Int64 => "int64",
        Type::Uint64 => "uint64",
        Type::Int32 => "int32",
        Type::Fixed64 => "fixed64",
        Type::Fixed32 => "fixed32",
        Type::Bool => "bool",
        Type::String => "string",
        Type::Bytes => "bytes",
        Type::Uint32 => "uint32",
        Type::Sfixed32 => "sfixed32",
        Type::Sfixed64 => "sfixed64",
        Type::Sint32 => "sint32",
        Type::Sint64 => "sint64",
        Type::Group | Type::Message | Type::Enum => "",
    }
}

/// The type of a field without its label.
fn bare_type(field: &FieldDescriptorProto) -> String {
    match field.r#type() {
        Type::Message | Type::Enum | Type::Group => type_ref(field.type_name()),
        scalar => format!("`{}`", scalar_name(scalar)),
    }
}

/// The type column of a field: `repeated`, `optional` and `map<K, V>` included.
fn field_type(
    field: &FieldDescriptorProto,
    messages: &HashMap<String, &DescriptorProto>,
) -> String {
    if field.label() == Label::Repeated
        && field.r#type() == Type::Message
        && let Some(entry) = messages.get(field.type_name())
        && entry.options.as_ref().is_some_and(|o| o.map_entry())
        && let [key, value] = entry.field.as_slice()
    {
        return format!("map&lt;{}, {}&gt;", bare_type(key), bare_type(value));
    }
    let bare = bare_type(field);
    match field.label() {
        Label::Repeated => format!("repeated {bare}"),
        _ if field.proto3_optional() => format!("optional {bare}"),
        Label::Required => format!("required {bare}"),
        _ => bare,
    }
}

fn ranges(ranges: impl Iterator<Item = (i32, i32)>) -> String {
    ranges
        .map(|(start, end)| {
            if start == end {
                start.to_string()
            } else {
                format!("{start} to {end}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn path(parent: &[i32], field: i32, index: usize) -> Vec<i32> {
    let mut p = parent.to_vec();
    p.push(field);
    p.push(i32::try_from(index).expect("fewer than 2^31 elements"));
    p
}

/// Renders one service: its comment, then each rpc with its types and comment.
fn render_service(
    out: &mut String,
    service: &ServiceDescriptorProto,
    at: &[i32],
    comments: &Comments,
) {
    let name = service.name();
    writeln!(out, "### {name}\n").unwrap();
    writeln!(out, "{}\n", block(comments.get(at))).unwrap();
    for (i, method) in service.method.iter().enumerate() {
        let stream = |yes: bool| if yes { "stream " } else { "" };
        writeln!(out, "#### {name}.{}\n", method.name()).unwrap();
        writeln!(
            out,
            "`rpc {}({}{}) returns ({}{})`\n",
            method.name(),
            stream(method.client_streaming()),
            method.input_type().rsplit('.').next().unwrap_or_default(),
            stream(method.server_streaming()),
            method.output_type().rsplit('.').next().unwrap_or_default(),
        )
        .unwrap();
        writeln!(
            out,
            "Request: {} · Response: {}\n",
            type_ref(method.input_type()),
            type_ref(method.output_type())
        )
        .unwrap();
        if method.options.as_ref().is_some_and(|o| o.deprecated()) {
            writeln!(out, "**Deprecated.**\n").unwrap();
        }
        writeln!(
            out,
            "{}\n",
            block(comments.get(&path(at, SERVICE_METHOD, i)))
        )
        .unwrap();
    }
}

/// Renders a message (then its nested types): comment, field table, oneofs, reserved.
fn render_message(
    out: &mut String,
    scope: &str,
    message: &DescriptorProto,
    at: &[i32],
    comments: &Comments,
    messages: &HashMap<String, &DescriptorProto>,
) {
    if message.options.as_ref().is_some_and(|o| o.map_entry()) {
        return; // shown as `map<K, V>` on its field
    }
    let name = if scope.is_empty() {
        message.name().to_owned()
    } else {
        format!("{scope}.{}", message.name())
    };
    writeln!(out, "### {name}\n").unwrap();
    if message.options.as_ref().is_some_and(|o| o.deprecated()) {
        writeln!(out, "**Deprecated.**\n").unwrap();
    }
    writeln!(out, "{}\n", block(comments.get(at))).unwrap();
    // Real oneofs only: proto3 `optional` makes a synthetic one per field.
    let real_oneof = |field: &FieldDescriptorProto| {
        field
            .oneof_index
            .filter(|_| !field.proto3_optional())
            .and_then(|i| usize::try_from(i).ok())
    };
    if message.field.is_empty() {
        writeln!(out, "No fields.\n").unwrap();
    } else {
        writeln!(out, "| Field | Number | Type | Description |").unwrap();
        writeln!(out, "|---|---|---|---|").unwrap();
        for (i, field) in message.field.iter().enumerate() {
            let mut description = String::new();
            if let Some(oneof) = real_oneof(field) {
                let oneof_name = message.oneof_decl.get(oneof).map_or("", |o| o.name());
                write!(description, "Part of oneof `{oneof_name}`. ").unwrap();
            }
            if field.options.as_ref().is_some_and(|o| o.deprecated()) {
                description.push_str("**Deprecated.** ");
            }
            description.push_str(
                &comments
                    .get(&path(at, MESSAGE_FIELD, i))
                    .map(cell)
                    .unwrap_or_default(),
            );
            writeln!(
                out,
                "| `{}` | {} | {} | {} |",
                field.name(),
                field.number(),
                field_type(field, messages),
                description.trim_end()
            )
            .unwrap();
        }
        writeln!(out).unwrap();
    }
    for (i, oneof) in message.oneof_decl.iter().enumerate() {
        let members: Vec<String> = message
            .field
            .iter()
            .filter(|f| real_oneof(f) == Some(i))
            .map(|f| format!("`{}`", f.name()))
            .collect();
        if members.is_empty() {
            continue;
        }
        let comment = comments
            .get(&path(at, MESSAGE_ONEOF, i))
            .map(|c| format!(" {}", cell(c)))
            .unwrap_or_default();
        writeln!(
            out,
            "Oneof `{}`: at most one of {} is set.{comment}\n",
            oneof.name(),
            members.join(", ")
        )
        .unwrap();
    }
    if !message.reserved_range.is_empty() {
        // Message ranges are end-exclusive.
        let text = ranges(
            message
                .reserved_range
                .iter()
                .map(|r| (r.start(), r.end() - 1)),
        );
        writeln!(out, "Reserved field numbers: {text}.\n").unwrap();
    }
    if !message.reserved_name.is_empty() {
        let names: Vec<String> = message
            .reserved_name
            .iter()
            .map(|n| format!("`{n}`"))
            .collect();
        writeln!(out, "Reserved field names: {}.\n", names.join(", ")).unwrap();
    }
    for (i, nested) in message.nested_type.iter().enumerate() {
        render_message(
            out,
            &name,
            nested,
            &path(at, MESSAGE_NESTED, i),
            comments,
            messages,
        );
    }
    for (i, nested) in message.enum_type.iter().enumerate() {
        render_enum(out, &name, nested, &path(at, MESSAGE_ENUM, i), comments);
    }
}

/// Renders an enum: comment and value table.
fn render_enum(
    out: &mut String,
    scope: &str,
    e: &EnumDescriptorProto,
    at: &[i32],
    comments: &Comments,
) {
    let name = if scope.is_empty() {
        e.name().to_owned()
    } else {
        format!("{scope}.{}", e.name())
    };
    writeln!(out, "### {name}\n").unwrap();
    writeln!(out, "{}\n", block(comments.get(at))).unwrap();
    writeln!(out, "| Value | Number | Description |").unwrap();
    writeln!(out, "|---|---|---|").unwrap();
    for (i, value) in e.value.iter().enumerate() {
        let description = comments
            .get(&path(at, ENUM_VALUE, i))
            .map(cell)
            .unwrap_or_default();
        writeln!(
            out,
            "| `{}` | {} | {} |",
            value.name(),
            value.number(),
            description
        )
        .unwrap();
    }
    writeln!(out).unwrap();
    if !e.reserved_range.is_empty() {
        // Enum ranges are end-inclusive.
        let text = ranges(e.reserved_range.iter().map(|r| (r.start(), r.end())));
        writeln!(out, "Reserved numbers: {text}.\n").unwrap();
    }
}

/// The whole reference.
fn render(set: &FileDescriptorSet) -> String {
    let files = package_files(set);
    let messages = index_messages(set);
    let mut out = String::new();
    writeln!(out, "# Tenantry API reference\n").unwrap();
    writeln!(
        out,
        "<!-- Generated from the comments in proto/tenantry/v1/*.proto by \
         proto/tests/api_reference.rs; do not edit. Regenerate with: {BLESS} -->\n"
    )
    .unwrap();
    writeln!(out, "{PREAMBLE}").unwrap();

    // Every rpc at a glance.
    writeln!(out, "## Services at a glance\n").unwrap();
    writeln!(out, "| Service | RPC | Request | Response |").unwrap();
    writeln!(out, "|---|---|---|---|").unwrap();
    for file in &files {
        for service in &file.service {
            for method in &service.method {
                let heading = format!("{}.{}", service.name(), method.name());
                writeln!(
                    out,
                    "| [{}](#{}) | [{}](#{}) | {} | {} |",
                    service.name(),
                    slug(service.name()),
                    method.name(),
                    slug(&heading),
                    type_ref(method.input_type()),
                    type_ref(method.output_type()),
                )
                .unwrap();
            }
        }
    }
    writeln!(out).unwrap();

    for file in &files {
        let comments = Comments::of(file);
        writeln!(out, "## {}\n", file.name()).unwrap();
        if let Some(text) = comments.file_comment() {
            writeln!(out, "{}\n", escape_text(&text)).unwrap();
        }
        for (i, service) in file.service.iter().enumerate() {
            render_service(&mut out, service, &[FILE_SERVICE, to_i32(i)], &comments);
        }
        for (i, message) in file.message_type.iter().enumerate() {
            render_message(
                &mut out,
                "",
                message,
                &[FILE_MESSAGE, to_i32(i)],
                &comments,
                &messages,
            );
        }
        for (i, e) in file.enum_type.iter().enumerate() {
            render_enum(&mut out, "", e, &[FILE_ENUM, to_i32(i)], &comments);
        }
    }
    // One trailing newline, however the last section ended.
    let trimmed = out.trim_end().len();
    out.truncate(trimmed);
    out.push('\n');
    out
}

fn to_i32(i: usize) -> i32 {
    i32::try_from(i).expect("fewer than 2^31 elements")
}

/// The first line where `want` and `have` differ, for a short failure message.
fn first_difference(want: &str, have: &str) -> String {
    let mut want_lines = want.lines();
    let mut have_lines = have.lines();
    let mut n = 1;
    loop {
        match (want_lines.next(), have_lines.next()) {
            (Some(w), Some(h)) if w == h => n += 1,
            (None, None) => return "they differ only in line endings".to_owned(),
            (w, h) => {
                return format!(
                    "first difference at line {n}:\n  generated: {}\n  committed: {}",
                    w.unwrap_or("<end of file>"),
                    h.unwrap_or("<end of file>")
                );
            }
        }
    }
}

#[test]
fn api_reference_matches_the_proto_comments() {
    let generated = render(&compile());
    let target = repo_root().join(OUTPUT);
    if std::env::var_os("TENANTRY_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&target, &generated)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", target.display()));
        return;
    }
    let committed = std::fs::read_to_string(&target).unwrap_or_default();
    assert!(
        committed == generated,
        "{OUTPUT} is stale: it differs from what the comments in proto/{PROTO_DIR}/*.proto \
         generate ({}).\nRegenerate it with `{BLESS}` and commit the result.",
        first_difference(&generated, &committed)
    );
}

/// Every service, rpc, message, field, oneof, enum and enum value has a comment, so the
/// reference never says "No description".
#[test]
fn every_element_of_the_contract_is_commented() {
    fn message(
        file: &str,
        scope: &str,
        m: &DescriptorProto,
        at: &[i32],
        c: &Comments,
        missing: &mut Vec<String>,
    ) {
        if m.options.as_ref().is_some_and(|o| o.map_entry()) {
            return;
        }
        let name = format!("{scope}{}", m.name());
        if c.get(at).is_none() {
            missing.push(format!("{file}: message {name}"));
        }
        for (i, f) in m.field.iter().enumerate() {
            if c.get(&path(at, MESSAGE_FIELD, i)).is_none() {
                missing.push(format!("{file}: field {name}.{}", f.name()));
            }
        }
        for (i, o) in m.oneof_decl.iter().enumerate() {
            let synthetic = m
                .field
                .iter()
                .any(|f| f.proto3_optional() && f.oneof_index == Some(to_i32(i)));
            if !synthetic && c.get(&path(at, MESSAGE_ONEOF, i)).is_none() {
                missing.push(format!("{file}: oneof {name}.{}", o.name()));
            }
        }
        for (i, n) in m.nested_type.iter().enumerate() {
            message(
                file,
                &format!("{name}."),
                n,
                &path(at, MESSAGE_NESTED, i),
                c,
                missing,
            );
        }
        for (i, e) in m.enum_type.iter().enumerate() {
            enumeration(
                file,
                &format!("{name}."),
                e,
                &path(at, MESSAGE_ENUM, i),
                c,
                missing,
            );
        }
    }
    fn enumeration(
        file: &str,
        scope: &str,
        e: &EnumDescriptorProto,
        at: &[i32],
        c: &Comments,
        missing: &mut Vec<String>,
    ) {
        let name = format!("{scope}{}", e.name());
        if c.get(at).is_none() {
            missing.push(format!("{file}: enum {name}"));
        }
        for (i, v) in e.value.iter().enumerate() {
            if c.get(&path(at, ENUM_VALUE, i)).is_none() {
                missing.push(format!("{file}: enum value {name}.{}", v.name()));
            }
        }
    }

    let set = compile();
    let mut missing = vec![];
    for file in package_files(&set) {
        let c = Comments::of(file);
        let name = file.name();
        if c.file_comment().is_none() {
            missing.push(format!("{name}: the file comment above `syntax`"));
        }
        for (i, s) in file.service.iter().enumerate() {
            let at = [FILE_SERVICE, to_i32(i)];
            if c.get(&at).is_none() {
                missing.push(format!("{name}: service {}", s.name()));
            }
            for (j, m) in s.method.iter().enumerate() {
                if c.get(&path(&at, SERVICE_METHOD, j)).is_none() {
                    missing.push(format!("{name}: rpc {}.{}", s.name(), m.name()));
                }
            }
        }
        for (i, m) in file.message_type.iter().enumerate() {
            message(name, "", m, &[FILE_MESSAGE, to_i32(i)], &c, &mut missing);
        }
        for (i, e) in file.enum_type.iter().enumerate() {
            enumeration(name, "", e, &[FILE_ENUM, to_i32(i)], &c, &mut missing);
        }
    }
    assert!(
        missing.is_empty(),
        "these have no comment; add one in the .proto file:\n  {}",
        missing.join("\n  ")
    );
}

/// Headings (as GitHub anchors) and in-page links of a markdown text.
fn anchors_and_links(markdown: &str) -> (Vec<String>, Vec<String>) {
    let mut anchors = vec![];
    let mut links = vec![];
    let mut in_fence = false;
    for line in markdown.lines() {
        if line.starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        if line.starts_with('#') {
            let heading = line.trim_start_matches('#').trim();
            anchors.push(slug(heading));
        }
        let mut rest = line;
        while let Some(at) = rest.find("](#") {
            let tail = &rest[at + 3..];
            let end = tail.find(')').unwrap_or(tail.len());
            links.push(tail[..end].to_owned());
            rest = &tail[end..];
        }
    }
    (anchors, links)
}

/// In the generated reference every heading anchor is unique and every `#…` link lands on
/// one; a type named like another heading would break a link silently otherwise.
#[test]
fn every_link_in_the_reference_lands_on_a_heading() {
    let text = render(&compile());
    let (anchors, links) = anchors_and_links(&text);
    let mut seen = BTreeSet::new();
    let duplicates: Vec<&String> = anchors.iter().filter(|a| !seen.insert(*a)).collect();
    assert!(duplicates.is_empty(), "duplicate anchors: {duplicates:?}");
    let dangling: BTreeSet<&String> = links.iter().filter(|l| !seen.contains(*l)).collect();
    assert!(dangling.is_empty(), "links to no heading: {dangling:?}");
    assert!(!links.is_empty(), "the reference links its types");
}

/// Backticked `UPPER_SNAKE` string literals in a Rust source file.
fn upper_snake_literals(source: &str) -> BTreeSet<String> {
    source
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| {
            s.len() >= 3
                && s.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
                && s.contains('_')
        })
        .map(str::to_owned)
        .collect()
}

/// Every `ErrorInfo.reason` the API can return (the string constants of `DenyReason` and
/// `AuthFailure` in `api/src/error.rs`) is explained in `docs/errors.md`.
#[test]
fn every_error_reason_the_api_returns_is_documented() {
    let root = repo_root();
    let source = std::fs::read_to_string(root.join("api/src/error.rs")).unwrap();
    let errors = std::fs::read_to_string(root.join("docs/errors.md")).unwrap();
    let reasons = upper_snake_literals(&source);
    assert!(
        reasons.contains("MFA_TOO_OLD") && reasons.contains("SESSION_INVALID"),
        "could not find the reasons in api/src/error.rs: {reasons:?}"
    );
    let undocumented: Vec<&String> = reasons
        .iter()
        .filter(|r| !errors.contains(&format!("`{r}`")))
        .collect();
    assert!(
        undocumented.is_empty(),
        "docs/errors.md does not explain these ErrorInfo reasons of api/src/error.rs: \
         {undocumented:?}"
    );
}

/// Code spans of a markdown text (outside fenced blocks).
fn code_spans(markdown: &str) -> Vec<String> {
    let mut spans = vec![];
    let mut in_fence = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        spans.extend(line.split('`').skip(1).step_by(2).map(str::to_owned));
    }
    spans
}

/// True when `source` declares or uses `ident` as a whole word.
fn mentions(source: &str, ident: &str) -> bool {
    source.match_indices(ident).any(|(at, _)| {
        let before = source[..at].chars().next_back();
        let after = source[at + ident.len()..].chars().next();
        let word = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        !word(before) && !word(after)
    })
}

/// The hand-written docs cite code as `path/to/file.rs` or `path/to/file.rs::item` (a
/// function, test, constant or type). Each cited file must exist and contain the item, so
/// a rename that would leave the docs pointing at nothing fails here.
#[test]
fn docs_cite_only_files_and_items_that_exist() {
    let root = repo_root();
    let docs = root.join("docs");
    let mut problems = vec![];
    let mut checked = 0;
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&docs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    entries.sort();
    for doc in entries {
        let text = std::fs::read_to_string(&doc).unwrap();
        let doc_name = doc.file_name().unwrap().to_string_lossy().into_owned();
        for span in code_spans(&text) {
            let (file, item) = match span.split_once("::") {
                Some((f, i)) => (f, Some(i)),
                None => (span.as_str(), None),
            };
            let cites_repo_file = [
                "api/",
                "client/",
                "cli/",
                "kube/",
                "pki/",
                "operator/",
                "tenant-runtime/",
                "proto/",
                "tests/",
                "charts/",
                "docs/",
                ".ci/",
                "fuzz/",
            ]
            .iter()
            .any(|top| file.starts_with(top))
                && !file.contains(' ')
                && !file.contains('*')
                && !file.contains('<');
            if !cites_repo_file {
                continue;
            }
            checked += 1;
            let path: &Path = Path::new(file);
            let full = root.join(path);
            if !full.exists() {
                problems.push(format!("{doc_name}: `{span}`: {file} does not exist"));
                continue;
            }
            if let Some(item) = item {
                let source = std::fs::read_to_string(&full).unwrap_or_default();
                let ident = item.rsplit("::").next().unwrap_or(item);
                if !mentions(&source, ident) {
                    problems.push(format!("{doc_name}: `{span}`: {file} has no `{ident}`"));
                }
            }
        }
    }
    assert!(checked > 0, "the docs cite no code at all");
    assert!(
        problems.is_empty(),
        "the docs cite code that does not exist:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn rendering_helpers_behave() {
    assert_eq!(normalize(" one\n   two\n\n"), "one\n  two");
    assert_eq!(cell("a |b|\n c"), "a \\|b\\| c");
    assert_eq!(escape_text("x <y> `<z>`"), "x &lt;y&gt; `<z>`");
    assert_eq!(slug("AccountService.Signup"), "accountservicesignup");
    assert_eq!(slug("account.proto"), "accountproto");
    assert_eq!(type_ref(".tenantry.v1.Tenant"), "[`Tenant`](#tenant)");
    assert_eq!(
        type_ref(".google.protobuf.Timestamp"),
        "`google.protobuf.Timestamp`"
    );
    assert_eq!(ranges([(4, 4), (7, 9)].into_iter()), "4, 7 to 9");
    assert!(mentions("fn check_crd(", "check_crd"));
    assert!(!mentions("fn check_crd_x(", "check_crd"));
    assert_eq!(
        upper_snake_literals(r#"a("MFA_REQUIRED") b("x") c("OK")"#),
        BTreeSet::from(["MFA_REQUIRED".to_owned()])
    );
}
