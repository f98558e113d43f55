//! The SQL sources' state in the index: checkpoints (also kept outside the index, so a rebuild
//! does not rewind a source), the last cycle of each, and the rewind `estafeta sources reset`
//! asks for.

use chrono::Utc;
use rusqlite::{OptionalExtension, TransactionBehavior, params};

use crate::layout;
use crate::*;

use super::Staging;

impl Staging {
    /// Every source the index knows, by name.
    pub fn sources(&self) -> Result<Vec<SourceState>, StoreError> {
        let db = self.db();
        let mut stmt = db.prepare(
            "SELECT name, checkpoint, last_run_at, last_rows, last_error FROM sources ORDER BY name",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok(SourceState {
                    name: r.get(0)?,
                    checkpoint: r
                        .get::<_, Option<String>>(1)?
                        .map(|c| crate::crypt::Keyring::reveal(self.shared().keys(), c)),
                    last_run_at: r.get(2)?,
                    last_rows: r.get::<_, Option<i64>>(3)?.map(|n| n as u64),
                    last_error: r
                        .get::<_, Option<String>>(4)?
                        .map(|e| crate::crypt::Keyring::reveal(self.shared().keys(), e)),
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// One source's checkpoint (JSON text), `None` before its first row.
    pub fn source_checkpoint(&self, name: &str) -> Result<Option<String>, StoreError> {
        let checkpoint = self
            .db()
            .query_row(
                "SELECT checkpoint FROM sources WHERE name = ?1",
                [name],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()?;
        Ok(checkpoint
            .flatten()
            .map(|c| crate::crypt::Keyring::reveal(self.shared().keys(), c)))
    }

    /// Rewinds a source on purpose: to `to` (JSON text), or to the start (`None`), so that
    /// its next cycle reads again from there. Records staged before are not touched.
    pub fn reset_source(&self, name: &str, to: Option<&str>) -> Result<(), StoreError> {
        let mut db = self.db();
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // The seq of the newest record, so that re-reading older records after a crash
        // cannot undo the reset.
        let newest: i64 = tx.query_row("SELECT COALESCE(MAX(seq), 0) FROM records", [], |r| {
            r.get(0)
        })?;
        tx.execute(
            "INSERT INTO sources (name, checkpoint, checkpoint_seq) VALUES (?1, ?2, ?3)
             ON CONFLICT(name) DO UPDATE SET checkpoint = excluded.checkpoint,
                 checkpoint_seq = MAX(sources.checkpoint_seq, excluded.checkpoint_seq)",
            params![
                name,
                to.map(|to| crate::crypt::seal_opt(self.shared().keys(), to)),
                newest
            ],
        )?;
        tx.commit()?;
        // Kept outside the index too, so that rebuilding the index does not undo it.
        crate::checkpoints::save(&db, &self.inner.shared.state_dir)?;
        Ok(())
    }

    /// Notes a source's cycle for `estafeta sources`: rows read, and the error if it failed.
    pub fn note_source_run(
        &self,
        name: &str,
        rows: u64,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        self.db().execute(
            "INSERT INTO sources (name, last_run_at, last_rows, last_error) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(name) DO UPDATE SET last_run_at = excluded.last_run_at,
                 last_rows = excluded.last_rows, last_error = excluded.last_error",
            params![
                name,
                layout::rfc3339(Utc::now()),
                rows as i64,
                error.map(|e| crate::crypt::seal_opt(self.shared().keys(), e))
            ],
        )?;
        Ok(())
    }
}
