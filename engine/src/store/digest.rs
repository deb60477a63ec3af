//! A digest of the replicated data, equal on two nodes that hold the same rows and clocks.

use super::*;

impl Store {
    /// A cheap fingerprint for comparing nodes: per table, its row count and a hash of its rows
    /// in key order; and a hash of every row clock. Two converged nodes have equal digests.
    pub fn digest(&self) -> Result<Digest, StoreError> {
        self.digest_until(None)
    }

    /// [`Store::digest`], stopped when still running at `deadline`: it reads every row and
    /// clock on the writer's thread, so without one a large database would hold the writer.
    /// It hashes as it reads, in the order the clocks' snapshot has (table name, then key), so
    /// its memory does not grow with the rows.
    pub fn digest_until(&self, deadline: Option<std::time::Instant>) -> Result<Digest, StoreError> {
        self.refuse_while_reload_owed()?;
        let started = std::time::Instant::now();
        self.interrupt.arm(deadline, None);
        let result = self.digest_rows();
        self.interrupt.disarm();
        match (result, self.interrupt.stopped()) {
            (Err(_), Some(Stopped::Deadline)) => Err(StoreError::DeadlinePassed(
                deadline.map_or(started.elapsed(), |d| d.saturating_duration_since(started)),
            )),
            (result, _) => result,
        }
    }

    /// Reads through the writer's connection: it is the one the deadline can stop, and no
    /// transaction is open between requests.
    fn digest_rows(&self) -> Result<Digest, StoreError> {
        let mut tables = BTreeMap::new();
        for (name, table) in &self.tables {
            let order: Vec<String> = table
                .pk
                .iter()
                .map(|&i| quote_ident(&table.def.columns[i].name))
                .collect();
            let sql = format!(
                "SELECT * FROM main.{} ORDER BY {}",
                quote_ident(name),
                order.join(", ")
            );
            let mut stmt = self.writer.prepare(&sql)?;
            let n = table.def.columns.len();
            let mut rows = stmt.query([])?;
            let mut hash = Fnv::new();
            let mut count = 0u64;
            while let Some(row) = rows.next()? {
                count += 1;
                for i in 0..n {
                    hash.value(&capture::to_value(row.get_ref(i)?));
                }
            }
            tables.insert(name.clone(), (count, hash.finish()));
        }
        let mut clocks = Fnv::new();
        let mut stmt = self.writer.prepare(
            "SELECT pk, cl, sentinel, cells FROM __patina_rows WHERE tbl = ?1 ORDER BY pk",
        )?;
        // `tables` is ordered by name and the key order is the bytes' (as `PackedPk`'s).
        for (name, table) in &self.tables {
            let mut rows = stmt.query([table.ord])?;
            while let Some(row) = rows.next()? {
                let clock =
                    self.snapshot_of(table, row.get(1)?, row.get_ref(2)?, row.get_ref(3)?)?;
                clocks.bytes(name.as_bytes());
                clocks.bytes(
                    row.get_ref(0)?
                        .as_blob()
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                );
                clocks.bytes(format!("{clock:?}").as_bytes());
            }
        }
        Ok(Digest {
            tables,
            clocks: clocks.finish(),
        })
    }
}
/// See [`Store::digest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    /// Per table: (row count, hash of the rows).
    pub tables: BTreeMap<String, (u64, u64)>,
    /// Hash of every row clock.
    pub clocks: u64,
}

/// FNV-1a, 64 bits: a fingerprint, not a defence against forgery.
pub(super) struct Fnv(u64);

impl Fnv {
    pub(super) fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    pub(super) fn bytes(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        // Length-delimit, so ("ab", "c") and ("a", "bc") differ.
        self.0 ^= bytes.len() as u64;
        self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
    }

    pub(super) fn value(&mut self, value: &Value) {
        match value {
            Value::Null => self.bytes(&[0]),
            Value::Integer(i) => self.bytes(&[&[1u8][..], &i.to_le_bytes()].concat()),
            Value::Real(r) => self.bytes(&[&[2u8][..], &r.to_bits().to_le_bytes()].concat()),
            Value::Text(t) => self.bytes(&[&[3u8][..], t.as_bytes()].concat()),
            Value::Blob(b) => self.bytes(&[&[4u8][..], b].concat()),
        }
    }

    pub(super) fn finish(&self) -> u64 {
        self.0
    }
}
