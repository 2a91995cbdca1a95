//! The device files of bulk import and export: CSV with a header row, or NDJSON (one JSON object
//! per line), with the columns `device_name`, `device_secret`, `node_id`, `psk_hex` and
//! `cell_id`, any of them empty. A file is read whole and every bad row is named by its line, so
//! an import is taken or refused as one. No I/O.

use serde::{Deserialize, Serialize};

use crate::identity::{DeviceName, NodeId, Secret};
use crate::registry::NewDevice;

/// Most devices one file may hold.
pub const MAX_ROWS: usize = 100_000;
/// Most problems one refusal lists.
pub const MAX_PROBLEMS: usize = 100;

/// The columns, in the order an export writes them.
pub const COLUMNS: [&str; 5] = ["device_name", "device_secret", "node_id", "psk_hex", "cell_id"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Csv,
    Ndjson,
}

impl Format {
    /// What a file is, by its first byte that is not whitespace.
    pub fn sniff(body: &[u8]) -> Format {
        match body.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') => Format::Ndjson,
            _ => Format::Csv,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Csv => "text/csv; charset=utf-8",
            Format::Ndjson => "application/x-ndjson",
        }
    }
}

/// One row as written: every column a string, empty when not given.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Line {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk_hex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cell_id: Option<String>,
}

/// A row that reads as a device: its line in the file, the device, its cell.
#[derive(Debug)]
pub struct Row {
    pub line: usize,
    pub device: NewDevice,
    pub cell_id: Option<String>,
}

/// Everything wrong with a file, each by its line (1 is the first line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<(usize, String)>);

impl std::fmt::Display for Problems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown: Vec<String> = self.0.iter().take(MAX_PROBLEMS).map(|(l, m)| format!("line {l}: {m}")).collect();
        write!(f, "{}", shown.join("; "))?;
        if self.0.len() > MAX_PROBLEMS {
            write!(f, "; and {} more", self.0.len() - MAX_PROBLEMS)?;
        }
        Ok(())
    }
}

/// Reads a whole file; every row checked, duplicates within the file named by both lines.
pub fn read(body: &[u8]) -> Result<Vec<Row>, Problems> {
    let lines = match Format::sniff(body) {
        Format::Csv => read_csv(body)?,
        Format::Ndjson => read_ndjson(body)?,
    };
    if lines.is_empty() {
        return Err(Problems(vec![(1, "the file has no devices".into())]));
    }
    if lines.len() > MAX_ROWS {
        let at = lines[MAX_ROWS].0;
        return Err(Problems(vec![(at, format!("a file holds at most {MAX_ROWS} devices"))]));
    }
    let mut problems = Vec::new();
    let mut rows = Vec::with_capacity(lines.len());
    let mut names = std::collections::HashMap::new();
    let mut nodes = std::collections::HashMap::new();
    for (at, line) in lines {
        match row(at, line) {
            Ok(r) => {
                if let Some(n) = &r.device.device_name
                    && let Some(first) = names.insert(n.to_string(), at)
                {
                    problems.push((at, format!("device name {n} repeats line {first}")));
                }
                if let Some(n) = &r.device.node_id
                    && let Some(first) = nodes.insert(n.to_string(), at)
                {
                    problems.push((at, format!("node id {n} repeats line {first}")));
                }
                rows.push(r);
            }
            Err(m) => problems.push((at, m)),
        }
    }
    if problems.is_empty() { Ok(rows) } else { Err(Problems(problems)) }
}

fn row(line: usize, l: Line) -> Result<Row, String> {
    let given = |v: Option<String>| v.filter(|s| !s.trim().is_empty()).map(|s| s.trim().to_string());
    let device_name = given(l.device_name).map(DeviceName::new).transpose().map_err(|e| format!("device_name: {e}"))?;
    let device_secret =
        given(l.device_secret).map(Secret::new).transpose().map_err(|e| format!("device_secret: {e}"))?;
    let node_id = given(l.node_id).map(NodeId::new).transpose().map_err(|e| format!("node_id: {e}"))?;
    let psk_hex = given(l.psk_hex).map(|p| p.to_ascii_lowercase());
    if psk_hex.as_deref().is_some_and(|psk| !hex::decode(psk).is_ok_and(|b| (1..=64).contains(&b.len()))) {
        return Err("psk_hex must be 1 to 64 bytes written as hex".into());
    }
    let cell_id = given(l.cell_id);
    if cell_id.as_ref().is_some_and(|c| c.len() > 64) {
        return Err("cell_id must be 1 to 64 characters".into());
    }
    Ok(Row { line, device: NewDevice { device_name, device_secret, node_id, psk_hex }, cell_id })
}

fn read_csv(body: &[u8]) -> Result<Vec<(usize, Line)>, Problems> {
    let mut reader = csv::ReaderBuilder::new().trim(csv::Trim::All).from_reader(body);
    let header = reader.headers().map_err(|e| Problems(vec![(1, format!("the header row: {e}"))]))?.clone();
    if let Some(unknown) = header.iter().find(|h| !COLUMNS.contains(h)) {
        let known = COLUMNS.join(", ");
        return Err(Problems(vec![(1, format!("unknown column {unknown:?}; the columns are {known}"))]));
    }
    let mut lines = Vec::new();
    let mut problems = Vec::new();
    for record in reader.records() {
        match record {
            Ok(r) => {
                let at = r.position().map_or(0, |p| p.line() as usize);
                let field =
                    |name: &str| header.iter().position(|h| h == name).and_then(|i| r.get(i)).map(str::to_string);
                lines.push((
                    at,
                    Line {
                        device_name: field("device_name"),
                        device_secret: field("device_secret"),
                        node_id: field("node_id"),
                        psk_hex: field("psk_hex"),
                        cell_id: field("cell_id"),
                    },
                ));
            }
            Err(e) => problems.push((e.position().map_or(0, |p| p.line() as usize), e.to_string())),
        }
        if lines.len() > MAX_ROWS {
            break;
        }
    }
    if problems.is_empty() { Ok(lines) } else { Err(Problems(problems)) }
}

fn read_ndjson(body: &[u8]) -> Result<Vec<(usize, Line)>, Problems> {
    let mut lines = Vec::new();
    let mut problems = Vec::new();
    for (i, text) in body.split(|b| *b == b'\n').enumerate() {
        if text.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Line>(text) {
            Ok(l) => lines.push((i + 1, l)),
            Err(e) => problems.push((i + 1, e.to_string())),
        }
        if lines.len() > MAX_ROWS {
            break;
        }
    }
    if problems.is_empty() { Ok(lines) } else { Err(Problems(problems)) }
}

/// Writes `lines` in `format` with the given columns (an export without secrets leaves theirs out).
pub fn write(format: Format, columns: &[&str], lines: &[Line]) -> Vec<u8> {
    match format {
        Format::Ndjson => {
            let mut out = Vec::with_capacity(lines.len() * 96);
            for l in lines {
                serde_json::to_writer(&mut out, l).expect("a line serialises");
                out.push(b'\n');
            }
            out
        }
        Format::Csv => {
            let mut w = csv::Writer::from_writer(Vec::with_capacity(lines.len() * 80));
            w.write_record(columns).expect("writes to memory");
            for l in lines {
                let value = |c: &str| match c {
                    "device_name" => l.device_name.as_deref(),
                    "device_secret" => l.device_secret.as_deref(),
                    "node_id" => l.node_id.as_deref(),
                    "psk_hex" => l.psk_hex.as_deref(),
                    _ => l.cell_id.as_deref(),
                };
                w.write_record(columns.iter().map(|c| value(c).unwrap_or(""))).expect("writes to memory");
            }
            w.into_inner().expect("writes to memory")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(body: &str) -> Vec<(usize, String)> {
        read(body.as_bytes()).unwrap_err().0
    }

    #[test]
    fn csv_and_ndjson_read_the_same_devices() {
        let csv = "device_name,node_id,psk_hex,cell_id\nm1,863000000000001,A1B2,cell-7\nm2,,,\n,,,\n";
        let rows = read(csv.as_bytes()).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].device.psk_hex.as_deref(), Some("a1b2"));
        assert_eq!(rows[0].cell_id.as_deref(), Some("cell-7"));
        assert_eq!((rows[1].line, rows[1].device.node_id.as_ref()), (3, None));
        assert!(rows[2].device.device_name.is_none(), "an empty name is generated");
        let nd = "{\"device_name\":\"m1\",\"node_id\":\"863000000000001\",\"psk_hex\":\"a1b2\",\"cell_id\":\"cell-7\"}\n\n{\"device_name\":\"m2\"}\n{}\n";
        let same = read(nd.as_bytes()).unwrap();
        assert_eq!(same.iter().map(|r| r.line).collect::<Vec<_>>(), [1, 3, 4]);
        assert_eq!(same[0].device.node_id, rows[0].device.node_id);
    }

    #[test]
    fn every_bad_row_is_named_by_its_line() {
        let csv = "device_name,node_id,psk_hex\nok,,\nbad name!,,\nok,,\nx,,zz\ny,1,\nz,1,\n";
        let p = problems(csv);
        assert_eq!(p.iter().map(|(l, _)| *l).collect::<Vec<_>>(), [3, 4, 5, 7], "{p:?}");
        assert!(p[0].1.starts_with("device_name"), "{p:?}");
        assert_eq!(p[1].1, "device name ok repeats line 2");
        assert!(p[2].1.contains("psk_hex"));
        assert_eq!(p[3].1, "node id 1 repeats line 6");
        assert!(problems("device_name,colour\na,red\n")[0].1.contains("unknown column \"colour\""));
        assert!(problems("device_name\n")[0].1.contains("no devices"));
        assert!(
            problems("{\"device_name\":\"a\"}\n{\"name\":\"b\"}\n")[0]
                == (2, problems("{\"name\":\"b\"}")[0].1.clone())
        );
        assert!(problems("device_name,node_id\na,1,extra\n")[0].0 == 2);
        let many: String =
            std::iter::once("device_name\n".to_string()).chain((0..=MAX_ROWS).map(|i| format!("d{i}\n"))).collect();
        assert_eq!(problems(&many), [(MAX_ROWS + 2, format!("a file holds at most {MAX_ROWS} devices"))]);
        let text = Problems((1..=150).map(|l| (l, "bad".to_string())).collect()).to_string();
        assert!(text.starts_with("line 1: bad; line 2: bad") && text.ends_with("; and 50 more"), "{text}");
    }

    #[test]
    fn what_is_written_reads_back() {
        let lines = vec![
            Line { device_name: Some("a,b".into()), device_secret: Some("s1".into()), ..Line::default() },
            Line {
                device_name: Some("c".into()),
                node_id: Some("9".into()),
                cell_id: Some("x".into()),
                ..Line::default()
            },
        ];
        for format in [Format::Csv, Format::Ndjson] {
            let file = write(format, &COLUMNS, &lines);
            assert_eq!(Format::sniff(&file), format);
            let mut back = Vec::new();
            match format {
                Format::Csv => back.extend(read_csv(&file).unwrap().into_iter().map(|(_, l)| l)),
                Format::Ndjson => back.extend(read_ndjson(&file).unwrap().into_iter().map(|(_, l)| l)),
            }
            let given = |v: &Option<String>| v.clone().filter(|s| !s.is_empty());
            let back: Vec<Line> = back
                .into_iter()
                .map(|l| Line {
                    device_name: given(&l.device_name),
                    device_secret: given(&l.device_secret),
                    node_id: given(&l.node_id),
                    psk_hex: given(&l.psk_hex),
                    cell_id: given(&l.cell_id),
                })
                .collect();
            assert_eq!(back, lines, "{format:?}");
        }
    }
}
