//! Opening a store: the folders (private modes), the sequence file, the index checked or
//! rebuilt from the folder, the hand-off to recovery (`recover.rs`) for what a crash left, the
//! lease owner registered and the writer thread started.

use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use crate::layout;
use crate::writer::{self, Writer};
use crate::*;

use super::{Inner, Shared, Staging};

/// How many stage requests may wait for the writer before callers block on the queue.
const QUEUE_DEPTH: usize = 16 * 1024;

impl Staging {
    /// Opens (creating if needed) the store, repairs what a crash left, rebuilds a missing or
    /// corrupt index from the folder.
    pub fn open(opts: Options) -> Result<(Staging, OpenReport), StoreError> {
        Self::open_inner(opts, false)
    }

    /// Rebuilds the index from the folder alone. Stop the daemon first: a running process
    /// keeps using the index it opened.
    pub fn reindex(opts: Options) -> Result<OpenReport, StoreError> {
        let (_store, report) = Self::open_inner(opts, true)?;
        Ok(report)
    }

    fn open_inner(opts: Options, force_rebuild: bool) -> Result<(Staging, OpenReport), StoreError> {
        for sink in &opts.sinks {
            if sink.is_empty() || sink.contains(',') {
                return Err(StoreError::UnknownSink(sink.clone()));
            }
        }
        let root = opts.root.clone();
        let state_dir = root.join(layout::STATE_DIR);
        let failed_dir = opts
            .failed_dir
            .clone()
            .unwrap_or_else(|| root.join(layout::FAILED_DIR));
        // First of all: a folder sealed with keys we were not given is left exactly as it is.
        crate::sealed_folder::check(&state_dir, opts.keys.as_deref())?;
        for d in [&root, &state_dir, &failed_dir] {
            layout::create_dir_durable(d).map_err(|e| StoreError::io("create folder", d, e))?;
            layout::make_private(d).map_err(|e| {
                StoreError::io("make private (mode 0700, it holds patient data)", d, e)
            })?;
        }

        // Before recovery, which may read sealed lines: they find their data keys here.
        let data_keys = Arc::new(crate::data_keys::DataKeySlots::new(&state_dir));
        if let Some(keys) = opts.keys.as_deref() {
            keys.attach(data_keys.clone());
        }
        let shared = Arc::new(Shared {
            root: root.clone(),
            state_dir: state_dir.clone(),
            failed_dir,
            opts,
            data_keys,
            poisoned: Mutex::new(None),
            is_poisoned: AtomicBool::new(false),
            blocked: Mutex::new(None),
            #[cfg(feature = "fault-injection")]
            fail_next_sync: AtomicBool::new(false),
            #[cfg(feature = "fault-injection")]
            fail_next_index: AtomicBool::new(false),
        });
        let mut seq_file = writer::open_seq_file(&state_dir)
            .map_err(|e| StoreError::io("open", state_dir.join("seq"), e))?;

        let mut report = OpenReport::default();
        let index_path = state_dir.join("index.sqlite3");
        let marker = state_dir.join("rebuild-index");
        let reason = if force_rebuild {
            Some("rebuild requested (reindex)".to_string())
        } else if marker.exists() {
            Some("an earlier run found the index damaged".to_string())
        } else if !index_path.exists() {
            // A new store has no index yet and nothing to rebuild it from: not worth a warning.
            let fresh = writer::read_seq(&mut seq_file).unwrap_or(0) == 0
                && crate::layout::walk_day_files(&root)
                    .map(|f| f.is_empty())
                    .unwrap_or(false);
            (!fresh).then(|| "index missing".to_string())
        } else {
            match crate::index::open(&index_path, true) {
                Ok(conn) => crate::index::check(&conn).err(),
                Err(e) => Some(e.to_string()),
            }
        };
        let db = if let Some(reason) = reason {
            seq_file
                .lock()
                .map_err(|e| StoreError::io("lock", state_dir.join("seq"), e))?;
            let result = (|| {
                crate::recover::set_aside_index(&index_path)?;
                let conn = crate::index::open(&index_path, true)?;
                crate::recover::recover(&shared, &conn, &mut seq_file, &mut report)?;
                crate::dead::apply_dead_letters(&shared, &conn)?;
                if shared.keys().is_some() {
                    // Rebuilt with keys: every key went in as its hash already.
                    crate::index::meta_set(&conn, "index_keys", "hashed")?;
                }
                Ok::<_, StoreError>(conn)
            })();
            let _ = seq_file.unlock();
            let conn = result?;
            let _ = std::fs::remove_file(&marker);
            report.index_rebuilt = true;
            report.rebuild_reason = Some(reason);
            conn
        } else {
            let conn = crate::index::open(&index_path, true)?;
            if let Some(keys) = shared.keys() {
                // Before recovery, which indexes what it finds with hashed keys already.
                crate::index::hash_keys(&conn, keys, &state_dir)?;
            }
            seq_file
                .lock()
                .map_err(|e| StoreError::io("lock", state_dir.join("seq"), e))?;
            let result = crate::recover::recover(&shared, &conn, &mut seq_file, &mut report);
            let _ = seq_file.unlock();
            result?;
            report.stale_dead_letters_removed = crate::dead::remove_stale_letters(&shared, &conn)?;
            conn
        };
        // Data keys whose segment a crash deleted before forgetting them: forget them now.
        let shredded = shared.data_keys.sweep(&root).map_err(|e| {
            StoreError::io("forget the data keys of deleted segments in", &state_dir, e)
        })?;
        if shredded > 0 {
            tracing::info!(
                shredded,
                "forgot the data keys of segments deleted before a crash (crypto-shredding)"
            );
        }
        for sink in &shared.opts.sinks {
            db.execute("INSERT OR IGNORE INTO sinks (name) VALUES (?1)", [sink])?;
        }
        crate::checkpoints::restore(&db, &state_dir)?;
        // Opening read the whole index (quick_check, recovery) through SQLite's page cache, up
        // to 2 MB that an idle agent would keep for nothing: give it back.
        db.execute_batch("PRAGMA shrink_memory")?;
        let (owner, owner_lock) = crate::leases::register(&state_dir)?;
        report.leases_released = crate::leases::release_orphaned(&db, &state_dir, &owner)?;

        let writer_conn = crate::index::open(&index_path, false)?;
        // The WAL is checkpointed on a thread of its own (wal_checkpointer.rs says why).
        let (checkpointer, nudge) =
            crate::wal_checkpointer::WalCheckpointer::start(&index_path, &writer_conn)?;
        let (tx, rx) = mpsc::sync_channel(QUEUE_DEPTH);
        let w = Writer::new(shared.clone(), writer_conn, seq_file, nudge);
        let handle = std::thread::Builder::new()
            .name("estafeta-staging-writer".into())
            .spawn(move || w.run(rx))
            .map_err(|e| StoreError::io("start writer thread for", &root, e))?;
        let store = Staging {
            inner: Arc::new(Inner {
                shared,
                owner,
                _owner_lock: owner_lock,
                db: Mutex::new(db),
                tx: Mutex::new(Some(tx)),
                writer: Mutex::new(Some(handle)),
                checkpointer: Mutex::new(Some(checkpointer)),
            }),
        };
        Ok((store, report))
    }
}
