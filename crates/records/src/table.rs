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
    let mut text = std::fs::read_to_string(path).map_err(io_err(path))?;
    if !text.ends_with('\n') {
        text.truncate(text.rfind('\n').map_or(0, |i| i + 1));
    }
    check_header::<T>(path, text.lines().next().unwrap_or_default())?;
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(text.as_bytes());
    rdr.deserialize()
        .map(|r| {
            r.map_err(|source| RecordsError::Csv {
                path: path.to_path_buf(),
                source,
            })
        })
        .collect()
}

/// Reads `moments.csv` (and the `coefficients.csv` beside it, when there is one) of a run
/// directory. Runs written before `coefficients.csv` existed kept the law's data
/// coefficients in `moments.csv`, with optimizer and scaling `any`: those rows are returned
/// as coefficient rows, so old run directories load as new ones do.
///
/// # Errors
/// As [`read_table`], for either file.
pub fn read_moments(path: &Path) -> Result<(Vec<MomentRow>, Vec<CoefRow>)> {
    let mut text = std::fs::read_to_string(path).map_err(io_err(path))?;
    if !text.ends_with('\n') {
        text.truncate(text.rfind('\n').map_or(0, |i| i + 1));
    }
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
    let (mut rows, mut coefs) = (Vec::new(), Vec::new());
    for rec in rdr.records() {
        let rec = rec.map_err(csv_err)?;
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
    let tmp = path.with_extension("json.tmp");
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
            let rows: Vec<MomentRow> = values.iter().map(|&v| MomentRow { value: v, alpha: v, ..Default::default() }).collect();
            w.append(&rows).expect("append");
            let back: Vec<MomentRow> = read_table(&p).expect("read");
            proptest::prop_assert_eq!(back, rows);
        }
    }
}
