//! Parquet copies of large tables (`NAME.parquet` beside `NAME.csv`): the CSV stays the
//! record (append-only while a run writes, checked against the manifest's sizes); a finished
//! run's large tables are also written as Parquet, typed and compressed, which pandas,
//! polars, DuckDB and Spark read in a fraction of the CSV's time and size.
//!
//! Column types are inferred from the CSV: a column whose every non-empty cell is an
//! integer is INT64, else one whose every non-empty cell is a number is DOUBLE, else a
//! UTF-8 string; empty cells are nulls. Values are written in the CSV's row order.
use crate::error::RecordsError;
use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType, DoubleType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Tables at least this large get a Parquet copy.
pub const PARQUET_MIN_BYTES: u64 = 4 << 20;

/// Rows per row group.
const ROW_GROUP: usize = 1 << 17;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Int,
    Double,
    Text,
}

fn kind_of(cells: &[String]) -> Kind {
    let mut k = Kind::Int;
    for c in cells.iter().filter(|c| !c.is_empty()) {
        if k == Kind::Int && c.parse::<i64>().is_err() {
            k = Kind::Double;
        }
        if k == Kind::Double && c.parse::<f64>().is_err() {
            return Kind::Text;
        }
    }
    k
}

fn invalid(path: &Path, msg: impl std::fmt::Display) -> RecordsError {
    RecordsError::Invalid {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

/// Writes `csv`'s rows as Parquet to `out` (through a temporary file renamed into place,
/// so a reader never sees half a file).
///
/// # Errors
/// An unreadable CSV, a ragged row, I/O.
pub fn write_parquet(csv_path: &Path, out: &Path) -> Result<(), RecordsError> {
    let mut reader = csv::Reader::from_path(csv_path).map_err(|source| RecordsError::Csv {
        path: csv_path.to_path_buf(),
        source,
    })?;
    let header: Vec<String> = reader
        .headers()
        .map_err(|source| RecordsError::Csv {
            path: csv_path.to_path_buf(),
            source,
        })?
        .iter()
        .map(str::to_string)
        .collect();
    let mut columns: Vec<Vec<String>> = vec![Vec::new(); header.len()];
    for rec in reader.records() {
        let rec = rec.map_err(|source| RecordsError::Csv {
            path: csv_path.to_path_buf(),
            source,
        })?;
        if rec.len() != header.len() {
            return Err(invalid(
                csv_path,
                "a row with another number of fields than the header",
            ));
        }
        for (col, cell) in columns.iter_mut().zip(rec.iter()) {
            col.push(cell.to_string());
        }
    }
    let kinds: Vec<Kind> = columns.iter().map(|c| kind_of(c)).collect();
    let fields: Vec<String> = header
        .iter()
        .zip(&kinds)
        .map(|(name, k)| match k {
            Kind::Int => format!("OPTIONAL INT64 {name};"),
            Kind::Double => format!("OPTIONAL DOUBLE {name};"),
            Kind::Text => format!("OPTIONAL BINARY {name} (UTF8);"),
        })
        .collect();
    let message = format!("message table {{ {} }}", fields.join(" "));
    let schema = Arc::new(
        parquet::schema::parser::parse_message_type(&message).map_err(|e| {
            invalid(
                csv_path,
                format!("column names do not make a Parquet schema: {e}"),
            )
        })?,
    );
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_created_by("rankstab".into())
            .build(),
    );
    let tmp = out.with_extension(format!("parquet.tmp{}", std::process::id()));
    let io = |e: std::io::Error| RecordsError::Io {
        path: tmp.clone(),
        source: e,
    };
    let pq = |e: parquet::errors::ParquetError| invalid(&tmp, format!("writing Parquet: {e}"));
    let file = std::fs::File::create(&tmp).map_err(io)?;
    let result = (|| -> Result<(), RecordsError> {
        let mut writer = SerializedFileWriter::new(file, schema, props).map_err(pq)?;
        let n = columns.first().map_or(0, Vec::len);
        let mut start = 0;
        while start < n || (n == 0 && start == 0) {
            let end = (start + ROW_GROUP).min(n);
            let mut group = writer.next_row_group().map_err(pq)?;
            for (col, kind) in columns.iter().zip(&kinds) {
                let cells = &col[start..end];
                let defs: Vec<i16> = cells.iter().map(|c| i16::from(!c.is_empty())).collect();
                let mut cw = group
                    .next_column()
                    .map_err(pq)?
                    .ok_or_else(|| invalid(&tmp, "fewer Parquet columns than CSV columns"))?;
                let present = cells.iter().filter(|c| !c.is_empty());
                match kind {
                    Kind::Int => {
                        let v: Vec<i64> = present.map(|c| c.parse().unwrap_or(0)).collect();
                        cw.typed::<Int64Type>()
                            .write_batch(&v, Some(&defs), None)
                            .map_err(pq)?;
                    }
                    Kind::Double => {
                        let v: Vec<f64> = present.map(|c| c.parse().unwrap_or(f64::NAN)).collect();
                        cw.typed::<DoubleType>()
                            .write_batch(&v, Some(&defs), None)
                            .map_err(pq)?;
                    }
                    Kind::Text => {
                        let v: Vec<ByteArray> =
                            present.map(|c| ByteArray::from(c.as_str())).collect();
                        cw.typed::<ByteArrayType>()
                            .write_batch(&v, Some(&defs), None)
                            .map_err(pq)?;
                    }
                }
                cw.close().map_err(pq)?;
            }
            group.close().map_err(pq)?;
            if n == 0 {
                break;
            }
            start = end;
        }
        writer.close().map_err(pq)?;
        std::fs::rename(&tmp, out).map_err(|e| RecordsError::Io {
            path: out.to_path_buf(),
            source: e,
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes `NAME.parquet` for every `NAME.csv` in `dir` of at least `min_bytes`; returns
/// the files written.
///
/// # Errors
/// See [`write_parquet`].
pub fn write_parquet_copies(dir: &Path, min_bytes: u64) -> Result<Vec<PathBuf>, RecordsError> {
    let mut written = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| RecordsError::Io {
        path: dir.to_path_buf(),
        source: e,
    })?;
    let mut csvs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "csv"))
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() >= min_bytes))
        .collect();
    csvs.sort();
    for csv in csvs {
        let out = csv.with_extension("parquet");
        write_parquet(&csv, &out)?;
        written.push(out);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;

    /// Every cell comes back with its type and value (nulls for empty cells); only large
    /// tables are copied.
    #[test]
    fn a_table_round_trips_through_parquet() {
        let dir = tempfile::tempdir().expect("tempdir");
        let csv = dir.path().join("t.csv");
        std::fs::write(
            &csv,
            "name,m,value,step\nfwd,1,0.5,0\nbwd,,1e-3,1\n\"a,b\",3,-2,2\n",
        )
        .expect("write");
        let out = dir.path().join("t.parquet");
        write_parquet(&csv, &out).expect("writes");
        let r = SerializedFileReader::new(std::fs::File::open(&out).expect("open")).expect("reads");
        let rows: Vec<Vec<(String, Field)>> = r
            .get_row_iter(None)
            .expect("rows")
            .map(|row| {
                row.expect("row")
                    .get_column_iter()
                    .map(|(n, f)| (n.clone(), f.clone()))
                    .collect()
            })
            .collect();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0][0], ("name".into(), Field::Str("fwd".into())));
        assert_eq!(rows[0][1], ("m".into(), Field::Long(1)));
        assert_eq!(rows[1][1], ("m".into(), Field::Null));
        assert_eq!(rows[1][2], ("value".into(), Field::Double(1e-3)));
        assert_eq!(rows[2][0].1, Field::Str("a,b".into()));
        assert_eq!(rows[2][2].1, Field::Double(-2.0));
        assert_eq!(rows[2][3].1, Field::Long(2));
        assert!(write_parquet_copies(dir.path(), 1 << 20)
            .expect("copies")
            .is_empty());
        let copies = write_parquet_copies(dir.path(), 1).expect("copies");
        assert_eq!(copies, vec![out]);
        assert!(std::fs::read_dir(dir.path()).expect("dir").all(|e| !e
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .contains(".tmp")));
    }
}
