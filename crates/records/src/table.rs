//! Crash-safe long-format tables (CSV) and atomic JSON documents.
//!
//! A table is appended in whole lines: each [`TableWriter::append`] serialises its rows
//! into memory and hands them to the kernel in one `write`, so a killed process leaves
//! only complete rows behind, except in the rare case of a short write, which readers
//! ([`read_table`]) and resuming writers ([`TableWriter::open`]) repair by dropping a
//! final line without its newline.
use crate::{CoefRow, MomentRow, RecordsError, Result};
use serde::{de::DeserializeOwned, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RecordsError + '_ {
    move |source| RecordsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Header line (without newline) of a record type, from its serde field names.
fn header_of<T: Serialize + Default>(path: &Path) -> Result<String> {
    let mut w = csv::WriterBuilder::new()
        .has_headers(true)
        .from_writer(Vec::new());
    w.serialize(T::default())
        .map_err(|source| RecordsError::Csv {
            path: path.to_path_buf(),
            source,
        })?;
    let bytes = w.into_inner().map_err(|e| RecordsError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let text = String::from_utf8_lossy(&bytes);
    Ok(text.lines().next().unwrap_or_default().to_string())
}

/// The header line `found` must be `T`'s.
fn check_header<T: Serialize + Default>(path: &Path, found: &str) -> Result<()> {
    let header = header_of::<T>(path)?;
    if found != header {
        return Err(RecordsError::Header {
            path: path.to_path_buf(),
            found: found.split(',').map(str::to_string).collect(),
            expected: header.split(',').map(str::to_string).collect(),
        });
    }
    Ok(())
}

/// Appends rows of `T` to a CSV table, one `write` per call.
pub struct TableWriter<T> {
    path: PathBuf,
    file: File,
    sync: bool,
    _row: PhantomData<T>,
}

impl<T: Serialize + DeserializeOwned + Default> TableWriter<T> {
    /// Opens `path` for appending, creating it with a header if it is new or empty.
    ///
    /// An existing file must carry `T`'s header ([`RecordsError::Header`] otherwise); a
    /// final partial line (left by a kill during a short write) is cut off.
    ///
    /// # Errors
    /// I/O errors, or a header that does not match `T`.
    ///
    /// ```
    /// use rankstab_records::{TableWriter, MetricRow, read_table};
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("metrics.csv");
    /// let mut w = TableWriter::<MetricRow>::open(&path).unwrap();
    /// w.append(&[MetricRow { step: 1, metric: rankstab_records::Metric::Loss, value: 2.5, ..Default::default() }]).unwrap();
    /// let rows: Vec<MetricRow> = read_table(&path).unwrap();
    /// assert_eq!(rows[0].value, 2.5);
    /// ```
    pub fn open(path: &Path) -> Result<Self> {
        let header = header_of::<T>(path)?;
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(io_err(path))?;
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(io_err(path))?;
        if text.is_empty() {
            file.write_all(format!("{header}\n").as_bytes())
                .map_err(io_err(path))?;
        } else {
            check_header::<T>(path, text.lines().next().unwrap_or_default())?;
            if !text.ends_with('\n') {
                let keep = text.rfind('\n').map_or(0, |i| i + 1) as u64;
                file.set_len(keep).map_err(io_err(path))?;
                file.seek(SeekFrom::End(0)).map_err(io_err(path))?;
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            sync: false,
            _row: PhantomData,
        })
    }

    /// Also `fsync` after every append (survives power loss, not only a kill).
    pub fn with_sync(mut self, sync: bool) -> Self {
        self.sync = sync;
        self
    }

    /// Appends `rows` as complete lines in a single write.
    ///
    /// # Errors
    /// Serialisation or I/O errors.
    pub fn append(&mut self, rows: &[T]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut w = csv::WriterBuilder::new()
            .has_headers(false)
            .from_writer(Vec::new());
        for row in rows {
            w.serialize(row).map_err(|source| RecordsError::Csv {
                path: self.path.clone(),
                source,
            })?;
        }
        let bytes = w.into_inner().map_err(|e| RecordsError::Io {
            path: self.path.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        self.file.write_all(&bytes).map_err(io_err(&self.path))?;
        self.file.flush().map_err(io_err(&self.path))?;
        if self.sync {
            self.file.sync_data().map_err(io_err(&self.path))?;
        }
        Ok(())
    }

    /// Current length of the file in bytes (a resume point for [`Self::truncate`]).
    ///
    /// # Errors
    /// I/O errors.
    pub fn len(&self) -> Result<u64> {
        Ok(self.file.metadata().map_err(io_err(&self.path))?.len())
    }

    /// Whether the table holds no rows yet (only its header).
    ///
    /// # Errors
    /// I/O errors.
    pub fn is_empty(&self) -> Result<bool> {
        let header = header_of::<T>(&self.path)?;
        Ok(self.len()? <= header.len() as u64 + 1)
    }

    /// Drops every row, keeping the header (a resume point before the first row).
    ///
    /// # Errors
    /// I/O errors.
    pub fn clear(&mut self) -> Result<()> {
        let header = header_of::<T>(&self.path)?;
        self.truncate(header.len() as u64 + 1)
    }

    /// Cuts the table back to `len` bytes (rows written after a resume point).
    ///
    /// # Errors
    /// I/O errors.
    pub fn truncate(&mut self, len: u64) -> Result<()> {
        self.file.set_len(len).map_err(io_err(&self.path))?;
        self.file
            .seek(SeekFrom::End(0))
            .map_err(io_err(&self.path))?;
        Ok(())
    }
}

/// Reads every complete row of a table written by [`TableWriter`]. A final line without
/// its newline (a write cut short by a kill) is ignored.
///
/// # Errors
/// I/O errors, a header that does not match `T`, or a malformed row (the error names the
/// file and the line).
pub fn read_table<T: Serialize + DeserializeOwned + Default>(path: &Path) -> Result<Vec<T>> {
    let text = read_complete_lines(path)?;
    check_header::<T>(path, text.lines().next().unwrap_or_default())?;
    let csv_err = |source| RecordsError::Csv {
        path: path.to_path_buf(),
        source,
    };
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(text.as_bytes());
    let headers = rdr.headers().map_err(csv_err)?.clone();
    let mut unique = Unique::new(path, &headers);
    let mut rows = Vec::new();
    for rec in rdr.records() {
        let rec = rec.map_err(csv_err)?;
        unique.check(&text, &rec)?;
        rows.push(rec.deserialize(Some(&headers)).map_err(csv_err)?);
    }
    Ok(rows)
}

/// The complete lines of a table file (a final line without its newline, left by a kill
/// during a write, is dropped).
fn read_complete_lines(path: &Path) -> Result<String> {
    let mut text = std::fs::read_to_string(path).map_err(io_err(path))?;
    if !text.ends_with('\n') {
        text.truncate(text.rfind('\n').map_or(0, |i| i + 1));
    }
    Ok(text)
}

/// Finds rows that repeat another row in every column but `value`: every table written by
/// rankstab has one row per key (the axes, seed or trial, step, ...), so a repeated key
/// means two writers appended to one table (or a table was concatenated), and the numbers
/// read from it would be wrong.
struct Unique<'a> {
    path: &'a Path,
    value: Option<usize>,
    /// Hash of a row's key -> byte offset of the first row with that hash.
    seen: std::collections::HashMap<u64, u64>,
}

impl<'a> Unique<'a> {
    fn new(path: &'a Path, headers: &csv::StringRecord) -> Self {
        Self {
            path,
            value: headers.iter().position(|h| h == "value"),
            seen: std::collections::HashMap::new(),
        }
    }

    fn key<'r>(&self, rec: &'r csv::StringRecord) -> impl Iterator<Item = &'r str> + 'r {
        let value = self.value;
        rec.iter()
            .enumerate()
            .filter(move |(i, _)| Some(*i) != value)
            .map(|(_, f)| f)
    }

    fn check(&mut self, text: &str, rec: &csv::StringRecord) -> Result<()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for f in self.key(rec) {
            f.hash(&mut h);
        }
        let offset = rec.position().map_or(0, csv::Position::byte);
        let Some(&first) = self.seen.get(&h.finish()) else {
            self.seen.insert(h.finish(), offset);
            return Ok(());
        };
        // Same hash: compare the keys themselves (the earlier row is re-read from the text).
        let earlier = csv::ReaderBuilder::new()
            .has_headers(false)
            .from_reader(text.as_bytes().get(first as usize..).unwrap_or_default())
            .records()
            .next();
        let same = match earlier {
            Some(Ok(e)) => self.key(&e).eq(self.key(rec)),
            _ => false,
        };
        if same {
            let line = |off: u64| text[..(off as usize).min(text.len())].matches('\n').count() + 1;
            return Err(RecordsError::Invalid {
                path: self.path.to_path_buf(),
                msg: format!(
                    "line {} repeats line {} (every column but the value): the table holds \
                     duplicate rows, as two processes writing one run leave; rerun it into a new \
                     directory",
                    line(offset),
                    line(first)
                ),
            });
        }
        Ok(())
    }
}

/// Reads `moments.csv` (and the `coefficients.csv` beside it, when there is one) of a run
/// directory. Runs written before `coefficients.csv` existed kept the law's data
/// coefficients in `moments.csv`, with optimizer and scaling `any`: those rows are returned
/// as coefficient rows, so old run directories load as new ones do.
///
/// # Errors
/// As [`read_table`], for either file.
pub fn read_moments(path: &Path) -> Result<(Vec<MomentRow>, Vec<CoefRow>)> {
    let text = read_complete_lines(path)?;
    check_header::<MomentRow>(path, text.lines().next().unwrap_or_default())?;
    let csv_err = |source| RecordsError::Csv {
        path: path.to_path_buf(),
        source,
    };
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(text.as_bytes());
    let headers = rdr.headers().map_err(csv_err)?.clone();
    let optimizer = headers.iter().position(|h| h == "optimizer");
    let mut unique = Unique::new(path, &headers);
    let (mut rows, mut coefs) = (Vec::new(), Vec::new());
    for rec in rdr.records() {
        let rec = rec.map_err(csv_err)?;
        unique.check(&text, &rec)?;
        if optimizer.and_then(|i| rec.get(i)) == Some("any") {
            coefs.push(rec.deserialize(Some(&headers)).map_err(csv_err)?);
        } else {
            rows.push(rec.deserialize(Some(&headers)).map_err(csv_err)?);
        }
    }
    let coef_path = path.with_file_name(crate::files::COEFFICIENTS);
    if coef_path.exists() {
        coefs.extend(read_table::<CoefRow>(&coef_path)?);
    }
    Ok((rows, coefs))
}

/// Writes `value` as pretty JSON to `path` atomically (temporary file, then rename), so a
/// reader never sees a half-written document.
///
/// # Errors
/// I/O or serialisation errors.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    // One temporary name per process, so that two writers of the same document (the
    // tasks of a sweep writing its identical sweep.json) cannot rename each other's file.
    let tmp = path.with_extension(format!("json.{}.tmp", std::process::id()));
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|source| RecordsError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    bytes.push(b'\n');
    {
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(&bytes).map_err(io_err(&tmp))?;
        f.sync_data().map_err(io_err(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    Ok(())
}

/// Reads a JSON document.
///
/// # Errors
/// I/O or parse errors naming the file.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|source| RecordsError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Rows and bytes of every CSV table in a run directory (a finished run records them in
/// its manifest).
///
/// # Errors
/// I/O errors.
pub fn table_sizes(dir: &Path) -> Result<std::collections::BTreeMap<String, crate::TableSize>> {
    let mut out = std::collections::BTreeMap::new();
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".csv") && entry.file_type().map_err(io_err(dir))?.is_file() {
            names.push(name);
        }
    }
    for name in names {
        out.insert(name.clone(), size_of_table(&dir.join(&name))?);
    }
    Ok(out)
}

fn size_of_table(path: &Path) -> Result<crate::TableSize> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let lines = bytes.iter().filter(|&&b| b == b'\n').count() as u64;
    Ok(crate::TableSize {
        rows: lines.saturating_sub(1),
        bytes: bytes.len() as u64,
    })
}

/// Checks a finished run's tables against the sizes its manifest recorded at completion:
/// a table cut short, appended to or rewritten since is refused, naming the file, what it
/// holds and what was recorded. Runs that recorded no sizes (written before rankstab
/// recorded them, or still running) pass.
///
/// # Errors
/// [`RecordsError::Invalid`] naming the damaged table; I/O errors.
pub fn verify_tables(dir: &Path, manifest: &crate::Manifest) -> Result<()> {
    for (name, want) in &manifest.tables {
        let path = dir.join(name);
        if !path.exists() {
            return Err(RecordsError::Invalid {
                path,
                msg: format!(
                    "is missing, but the manifest recorded {} rows in it at completion: the run is damaged; rerun it into a new directory",
                    want.rows
                ),
            });
        }
        let got = size_of_table(&path)?;
        if got != *want {
            return Err(RecordsError::Invalid {
                path,
                msg: format!(
                    "holds {} rows ({} bytes), but the manifest recorded {} rows ({} bytes) at completion: the table was cut, appended to or rewritten since, so the run is damaged; rerun it into a new directory",
                    got.rows, got.bytes, want.rows, want.bytes
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MomentRow;

    fn row(i: u32) -> MomentRow {
        MomentRow {
            step: i,
            m: if i.is_multiple_of(2) { Some(2) } else { None },
            value: i as f64 * 0.1,
            ..Default::default()
        }
    }

    #[test]
    fn append_reopen_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("moments.csv");
        let mut w = TableWriter::<MomentRow>::open(&p).expect("open");
        w.append(&[row(0), row(1)]).expect("append");
        drop(w);
        let mut w = TableWriter::<MomentRow>::open(&p).expect("reopen");
        w.append(&[row(2)]).expect("append");
        let rows: Vec<MomentRow> = read_table(&p).expect("read");
        assert_eq!(rows, vec![row(0), row(1), row(2)]);
    }

    #[test]
    fn partial_last_line_is_dropped_by_reader_and_writer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("moments.csv");
        let mut w = TableWriter::<MomentRow>::open(&p).expect("open");
        w.append(&[row(0), row(1)]).expect("append");
        drop(w);
        // Simulate a kill in the middle of a write: half a line at the end.
        let mut f = OpenOptions::new().append(true).open(&p).expect("open");
        f.write_all(b"theory,synth,adap").expect("write");
        drop(f);
        let rows: Vec<MomentRow> = read_table(&p).expect("read");
        assert_eq!(rows.len(), 2);
        let mut w = TableWriter::<MomentRow>::open(&p).expect("reopen");
        w.append(&[row(7)]).expect("append");
        let rows: Vec<MomentRow> = read_table(&p).expect("read");
        assert_eq!(rows, vec![row(0), row(1), row(7)]);
    }

    #[test]
    fn wrong_header_is_refused_with_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("moments.csv");
        std::fs::write(&p, "a,b\n1,2\n").expect("write");
        let err = TableWriter::<MomentRow>::open(&p).err().expect("must fail");
        assert!(err.to_string().contains("moments.csv"), "{err}");
        assert!(matches!(err, RecordsError::Header { .. }));
    }

    #[test]
    fn clear_keeps_only_the_header() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("m.csv");
        let mut w = TableWriter::<MomentRow>::open(&p).expect("open");
        w.append(&[row(0), row(1)]).expect("append");
        w.clear().expect("clear");
        assert!(w.is_empty().expect("len"));
        w.append(&[row(5)]).expect("append");
        let rows: Vec<MomentRow> = read_table(&p).expect("read");
        assert_eq!(rows, vec![row(5)]);
    }

    #[test]
    fn truncate_returns_to_a_resume_point() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("m.csv");
        let mut w = TableWriter::<MomentRow>::open(&p).expect("open");
        w.append(&[row(0)]).expect("append");
        let mark = w.len().expect("len");
        w.append(&[row(1), row(2)]).expect("append");
        w.truncate(mark).expect("truncate");
        w.append(&[row(3)]).expect("append");
        let rows: Vec<MomentRow> = read_table(&p).expect("read");
        assert_eq!(rows, vec![row(0), row(3)]);
    }

    #[test]
    fn old_moments_with_coefficient_rows_load_split() {
        // A moments.csv as runs wrote it before coefficients.csv existed: the law's data
        // coefficients inline, with optimizer and scaling "any".
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("moments.csv");
        std::fs::write(
            &p,
            "source,model,module,layer,rank,alpha,scaling,beta,optimizer,inputs,dist,width,seed,step,site,stat,m,value\n\
             theory,synthetic,adapter,0,4,1.0,rslora,0.5,sgd,coherent,gaussian,64,7,1,fwd,abs,2,0.25\n\
             theory,synthetic,adapter,0,0,1.0,any,0.0,any,coherent,gaussian,64,7,1,fwd,coef_quad,,3.5\n",
        )
        .expect("write");
        let (rows, coefs) = read_moments(&p).expect("read");
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].site, rows[0].stat, rows[0].scaling),
            (crate::Site::Fwd, crate::Stat::Abs, crate::Scaling::RSLORA)
        );
        assert_eq!(coefs.len(), 1);
        assert_eq!(
            (coefs[0].stat, coefs[0].value, coefs[0].seed),
            (crate::CoefStat::Quad, 3.5, 7)
        );
        // A new run keeps them in coefficients.csv beside moments.csv.
        let mut w = TableWriter::<CoefRow>::open(&dir.path().join(crate::files::COEFFICIENTS))
            .expect("open");
        w.append(&[CoefRow {
            value: 1.5,
            ..Default::default()
        }])
        .expect("append");
        let (_, coefs) = read_moments(&p).expect("read");
        assert_eq!(coefs.len(), 2);
        // An unknown site names the file.
        std::fs::write(
            &p,
            std::fs::read_to_string(&p)
                .expect("read")
                .replace(",fwd,abs,", ",fwdd,abs,"),
        )
        .expect("write");
        let err = read_moments(&p).expect_err("unknown site");
        assert!(
            err.to_string().contains("moments.csv") && err.to_string().contains("fwdd"),
            "{err}"
        );
    }

    #[test]
    fn duplicate_rows_are_refused_naming_both_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("moments.csv");
        let mut w = TableWriter::<MomentRow>::open(&p).expect("open");
        w.append(&[row(0), row(1), row(2)]).expect("append");
        // The same key with another value: what two writers of one run leave.
        w.append(&[MomentRow {
            value: 9.0,
            ..row(1)
        }])
        .expect("append");
        for err in [
            read_table::<MomentRow>(&p)
                .expect_err("duplicate")
                .to_string(),
            read_moments(&p).expect_err("duplicate").to_string(),
        ] {
            assert!(
                err.contains("moments.csv") && err.contains("line 5 repeats line 3"),
                "{err}"
            );
        }
        // Rows that differ in any key column are not duplicates.
        let q = dir.path().join("other.csv");
        let mut w = TableWriter::<MomentRow>::open(&q).expect("open");
        w.append(&[row(0), row(1), MomentRow { seed: 5, ..row(1) }])
            .expect("append");
        assert_eq!(read_table::<MomentRow>(&q).expect("distinct").len(), 3);
    }

    #[test]
    fn finished_tables_are_checked_against_their_recorded_sizes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("moments.csv");
        let mut w = TableWriter::<MomentRow>::open(&p).expect("open");
        w.append(&[row(0), row(1), row(2)]).expect("append");
        let sizes = table_sizes(dir.path()).expect("sizes");
        assert_eq!(sizes["moments.csv"].rows, 3);
        let manifest = crate::Manifest {
            schema_version: crate::SCHEMA_VERSION,
            tool: "rankstab".into(),
            tool_version: "0".into(),
            git_revision: None,
            command: "theory".into(),
            config: serde_json::json!({}),
            seeds: vec![],
            device: String::new(),
            created: String::new(),
            finished: None,
            status: crate::RunStatus::Complete,
            note: None,
            tables: sizes,
        };
        verify_tables(dir.path(), &manifest).expect("as recorded");
        w.truncate(w.len().expect("len") - 5).expect("cut");
        let e = verify_tables(dir.path(), &manifest)
            .expect_err("cut")
            .to_string();
        assert!(
            e.contains("moments.csv") && e.contains("recorded 3 rows"),
            "{e}"
        );
        std::fs::remove_file(&p).expect("rm");
        let e = verify_tables(dir.path(), &manifest)
            .expect_err("missing")
            .to_string();
        assert!(e.contains("is missing"), "{e}");
    }

    #[test]
    fn json_round_trip_is_atomic_and_exact() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("fits.json");
        let fits = vec![crate::Fit {
            slope: -0.123456789,
            ranks: vec![4, 8],
            ..Default::default()
        }];
        write_json_atomic(&p, &fits).expect("write");
        assert!(!p.with_extension("json.tmp").exists());
        let back: Vec<crate::Fit> = read_json(&p).expect("read");
        assert_eq!(back, fits);
    }

    proptest::proptest! {
        /// Floats survive the CSV round trip bit for bit (ryu shortest representation).
        #[test]
        fn floats_round_trip(values in proptest::collection::vec(proptest::num::f64::NORMAL | proptest::num::f64::ZERO, 1..20)) {
            let dir = tempfile::tempdir().expect("tempdir");
            let p = dir.path().join("m.csv");
            let mut w = TableWriter::<MomentRow>::open(&p).expect("open");
            let rows: Vec<MomentRow> = values.iter().enumerate().map(|(i, &v)| MomentRow { value: v, alpha: v, step: i as u32, ..Default::default() }).collect();
            w.append(&rows).expect("append");
            let back: Vec<MomentRow> = read_table(&p).expect("read");
            proptest::prop_assert_eq!(back, rows);
        }
    }
}
