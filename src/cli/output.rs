//! Streaming rows to stdout as a table, a JSON array or CSV.
//!
//! Rows arrive a page at a time and leave as soon as they arrive, so a ten-million-row audit log
//! never sits in memory. That rules out sizing table columns to their widest value: columns have
//! fixed widths, and a longer value pushes the rest of its line right.

use std::io::{self, Write};

use serde::Serialize;

use crate::store::{EpochRow, Page, RejectionRow, ResourceRow};

/// The output formats of `audit` and `epochs`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    #[default]
    Table,
    /// One JSON array of objects, with the admin API's field names.
    Json,
    /// RFC 4180 CSV with a header row.
    Csv,
}

/// A row type that can be shown in every [`Format`].
pub trait Tabular: Serialize {
    /// Column names: the header of the table and of the CSV.
    const COLUMNS: &'static [&'static str];
    /// Table column widths, one per column except the last, which is never padded.
    const WIDTHS: &'static [usize];
    /// The row's values, as text, in column order; absent values are empty.
    fn cells(&self) -> Vec<String>;
}

impl Tabular for RejectionRow {
    const COLUMNS: &'static [&'static str] = &[
        "id",
        "at",
        "resource",
        "reason",
        "token",
        "highest",
        "method",
        "client",
        "request_id",
        "path",
        "identity",
    ];
    // The path before the identity, as before identities were audited: scripts that cut columns
    // keep working, and rows without an identity end where they did.
    const WIDTHS: &'static [usize] = &[8, 24, 20, 7, 20, 20, 7, 21, 36, 24];

    fn cells(&self) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.at.clone(),
            self.resource.clone(),
            self.reason.clone(),
            optional(self.token),
            optional(self.highest),
            self.method.clone(),
            self.client.clone(),
            self.request_id.clone().unwrap_or_default(),
            self.path.clone(),
            self.identity.clone().unwrap_or_default(),
        ]
    }
}

impl Tabular for ResourceRow {
    const COLUMNS: &'static [&'static str] = &["resource", "highest", "updated_at"];
    const WIDTHS: &'static [usize] = &[32, 20];

    fn cells(&self) -> Vec<String> {
        vec![
            self.resource.clone(),
            self.highest.to_string(),
            self.updated_at.clone(),
        ]
    }
}

impl Tabular for EpochRow {
    const COLUMNS: &'static [&'static str] =
        &["id", "at", "resource", "from", "to", "via", "reason"];
    const WIDTHS: &'static [usize] = &[8, 24, 32, 20, 20, 6];

    fn cells(&self) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.at.clone(),
            self.resource.clone(),
            optional(self.from),
            self.to.to_string(),
            self.via.clone(),
            self.reason.clone().unwrap_or_default(),
        ]
    }
}

fn optional(value: Option<u64>) -> String {
    value.map(|value| value.to_string()).unwrap_or_default()
}

/// Writes every row that `next_page` yields, page after page, until a page says there is no
/// next one. `next_page` gets the last row written so far, to continue after it. Returns how many
/// rows were written.
pub fn stream<T, E>(
    format: Format,
    out: impl Write,
    mut next_page: impl FnMut(Option<&T>) -> Result<Page<T>, E>,
) -> Result<u64, StreamError<E>>
where
    T: Tabular,
{
    let mut sink = Sink::start::<T>(format, out)?;
    let mut last = None;
    let mut rows = 0;
    loop {
        let mut page = next_page(last.as_ref()).map_err(StreamError::Source)?;
        for row in &page.rows {
            sink.row(row, rows == 0)?;
            rows += 1;
        }
        last = page.rows.pop();
        if page.next.is_none() || last.is_none() {
            break;
        }
    }
    sink.finish(rows == 0)?;
    Ok(rows)
}

/// Why streaming stopped early.
#[derive(Debug, thiserror::Error)]
pub enum StreamError<E> {
    /// Reading the rows failed.
    #[error("{0}")]
    Source(E),
    /// Writing them failed; a closed pipe (`| head`) shows up here as `BrokenPipe`.
    #[error("cannot write the output: {0}")]
    Write(#[from] io::Error),
}

enum Sink<W: Write> {
    Table(W),
    Json(W),
    // Boxed: the CSV writer carries its own buffer, much larger than a bare writer.
    Csv(Box<csv::Writer<W>>),
}

/// Turns the end of a stream into an exit status: a reader that closed the pipe early (`| head`)
/// is a normal end, not an error.
pub fn finish<E: std::fmt::Display>(
    command: &str,
    result: Result<u64, StreamError<E>>,
) -> std::process::ExitCode {
    match result {
        Ok(_) => std::process::ExitCode::SUCCESS,
        Err(StreamError::Write(e)) if e.kind() == io::ErrorKind::BrokenPipe => {
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fencegate {command}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

impl<W: Write> Sink<W> {
    fn start<T: Tabular>(format: Format, mut out: W) -> io::Result<Self> {
        Ok(match format {
            Format::Table => {
                let header: Vec<String> = T::COLUMNS.iter().map(|c| c.to_uppercase()).collect();
                write_table_line(&mut out, &header, T::WIDTHS)?;
                Sink::Table(out)
            }
            Format::Json => {
                out.write_all(b"[")?;
                Sink::Json(out)
            }
            Format::Csv => {
                let mut csv = csv::Writer::from_writer(out);
                csv.write_record(T::COLUMNS).map_err(io::Error::other)?;
                Sink::Csv(Box::new(csv))
            }
        })
    }

    fn row<T: Tabular>(&mut self, row: &T, first: bool) -> io::Result<()> {
        match self {
            Sink::Table(out) => write_table_line(out, &row.cells(), T::WIDTHS),
            Sink::Json(out) => {
                out.write_all(if first { b"\n" } else { b",\n" })?;
                serde_json::to_writer(&mut *out, row)?;
                Ok(())
            }
            Sink::Csv(csv) => csv.write_record(row.cells()).map_err(io::Error::other),
        }
    }

    fn finish(self, empty: bool) -> io::Result<()> {
        match self {
            Sink::Table(mut out) => out.flush(),
            Sink::Json(mut out) => {
                out.write_all(if empty { b"]\n" } else { b"\n]\n" })?;
                out.flush()
            }
            Sink::Csv(mut csv) => csv.flush(),
        }
    }
}

/// One table line. Values come from clients (paths, request ids): control characters are
/// escaped, so that no value can move the cursor or recolour the operator's terminal.
fn write_table_line(out: &mut impl Write, cells: &[String], widths: &[usize]) -> io::Result<()> {
    let mut line = String::new();
    for (index, cell) in cells.iter().enumerate() {
        let cell = printable(cell);
        let cell = if cell.is_empty() { "-".into() } else { cell };
        match widths.get(index) {
            Some(width) => line.push_str(&format!("{cell:<width$} ")),
            None => line.push_str(&cell),
        }
    }
    writeln!(out, "{}", line.trim_end())
}

fn printable(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, path: &str) -> RejectionRow {
        RejectionRow {
            id,
            at: "2026-11-23T10:00:00.000Z".into(),
            resource: "wallet:1".into(),
            reason: "stale".into(),
            token: Some(1),
            highest: Some(2),
            method: "PUT".into(),
            path: path.into(),
            client: "127.0.0.1:5000".into(),
            request_id: None,
            identity: None,
        }
    }

    /// Serves `rows` in pages of two, like the database does.
    fn render(format: Format, rows: Vec<RejectionRow>) -> String {
        let mut out = Vec::new();
        stream(format, &mut out, |last: Option<&RejectionRow>| {
            let start = last.map_or(0, |row| row.id as usize);
            let end = (start + 2).min(rows.len());
            let next = (end < rows.len()).then(|| end.to_string());
            Ok::<_, ()>(Page {
                rows: rows[start..end].to_vec(),
                next,
            })
        })
        .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn json_is_one_array_across_pages() {
        let text = render(Format::Json, (1..=5).map(|id| row(id, "/w/1")).collect());
        let parsed: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed.len(), 5);
        assert_eq!(parsed[4]["id"], 5);
        assert_eq!(parsed[0]["request_id"], serde_json::Value::Null);
        assert_eq!(render(Format::Json, vec![]), "[]\n");
    }

    #[test]
    fn csv_quotes_what_needs_quoting() {
        let text = render(Format::Csv, vec![row(1, "/w/a,\"b\"")]);
        let mut lines = text.lines();
        assert_eq!(
            lines.next(),
            Some("id,at,resource,reason,token,highest,method,client,request_id,path,identity")
        );
        assert_eq!(
            lines.next(),
            Some(
                "1,2026-11-23T10:00:00.000Z,wallet:1,stale,1,2,PUT,127.0.0.1:5000,,\"/w/a,\"\"b\"\"\","
            )
        );
    }

    #[test]
    fn table_escapes_control_characters_and_marks_empty_cells() {
        let text = render(Format::Table, vec![row(1, "/w/\u{1b}[31mred")]);
        let line = text.lines().nth(1).unwrap();
        assert!(line.contains(" /w/\\u{1b}[31mred "), "{line}");
        assert!(
            line.ends_with(" -"),
            "the absent identity shows as -: {line}"
        );
        assert!(!text.contains('\u{1b}'));
        assert!(
            line.contains(" - "),
            "the absent request id shows as -: {line}"
        );
        assert!(text.starts_with("ID "));
    }
}
