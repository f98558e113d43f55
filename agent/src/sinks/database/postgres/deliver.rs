//! One part of a batch on one connection of the PostgreSQL sink: the COPY fast path, the
//! exactly-once path through the temporary table, apply mode (its statements pipelined), and
//! the row-by-row fallback under savepoints that makes only the refused records dead and skips
//! the rest of their keys' runs (the paths are described in [`super`]).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::Poll;

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{GenericClient, Statement, Transaction};

use super::copy::{
    COPY_INCOMING_SQL, CopyError, INCOMING_TABLE_SQL, INSERT_FROM_INCOMING_RETURNING_SQL,
    INSERT_FROM_INCOMING_SQL, write_rows,
};
use super::{Connection, INSERT_RETURNING_SQL, PostgresSink, errors};
use crate::db::apply::Bound;
use crate::sinks::database::landing::{ApplyRow, Failure, LandingRow, Stopped};
use crate::sinks::{Outcome, Refusal};

/// Apply statements prepared on the current connection, by file, for one batch.
type Prepared = HashMap<PathBuf, Statement>;

impl PostgresSink {
    /// Delivers the rows on the slot's connection, (re)connecting first when needed. `Err`
    /// means: retry the whole batch.
    pub(super) async fn deliver_rows(
        &self,
        slot: &mut Option<Connection>,
        rows: &[LandingRow<'_>],
    ) -> Result<Vec<Outcome>, String> {
        let conn = self.open(slot).await?;
        if self.apply.is_some() {
            return self.deliver_applied(conn, rows).await;
        }
        if self.transaction_pooling {
            return self.deliver_inserted(conn, rows).await;
        }
        // The fast path: one COPY, which PostgreSQL runs as a transaction of its own (no BEGIN
        // and COMMIT round trips around it): all the rows land, or none.
        let copied = async {
            let copy = conn
                .copy
                .as_ref()
                .expect("prepared at connect without a pooler");
            let sink = conn.client.copy_in(copy).await?;
            write_rows(sink, &self.agent_id, rows).await
        }
        .await;
        let err = match copied {
            Ok(_) => return Ok(vec![Outcome::Delivered; rows.len()]),
            Err(CopyError::Server(err)) => err,
            Err(CopyError::Encode { seq, error }) => {
                tracing::debug!(sink = %self.name, seq, error, "A row could not be encoded for COPY; inserting the batch row by row.");
                return self.insert_row_by_row(conn, rows).await;
            }
        };
        let refusal = if errors::is_resend(&err) {
            tracing::debug!(sink = %self.name, records = rows.len(), "Part of the batch is already in the landing table (a resend); inserting the rest.");
            match self.deliver_exactly_once(conn, rows).await {
                Ok(()) => return Ok(vec![Outcome::Delivered; rows.len()]),
                Err(Failure::Transient(error)) => return Err(error),
                Err(Failure::Row(refusal)) => refusal,
            }
        } else {
            match self.failure(err) {
                Failure::Transient(error) => return Err(error),
                Failure::Row(refusal) => refusal,
            }
        };
        tracing::debug!(sink = %self.name, error = %refusal.summary, "A row was refused; inserting the batch row by row.");
        self.insert_row_by_row(conn, rows).await
    }

    /// Behind a transaction pooler: the part in one `INSERT … SELECT FROM UNNEST … ON CONFLICT
    /// DO NOTHING` (`sql/postgres/insert_records.sql`), prepared, run and closed inside one
    /// transaction, so on the one server connection the pooler lends for it. No COPY: when a
    /// COPY fails server-side (a resend's unique key, a value jsonb refuses) while the client
    /// still sends its data, PgBouncer (1.18 in Debian 12, and up to 1.25) loses track of the
    /// server connection and the next transaction hangs (pgbouncer/pgbouncer#1470, seen here).
    /// A resend cannot fail this insert; a refused row sends the part row by row.
    async fn deliver_inserted(
        &self,
        conn: &mut Connection,
        rows: &[LandingRow<'_>],
    ) -> Result<Vec<Outcome>, String> {
        let inserted = async {
            let fail = |err| self.failure(err);
            let tx = conn.client.transaction().await.map_err(fail)?;
            match self.insert_many(&tx, super::INSERT_SQL, rows).await {
                Ok(_) => tx.commit().await.map_err(fail),
                Err(failure) => {
                    self.roll_back(tx, &failure).await?;
                    Err(failure)
                }
            }
        }
        .await;
        match inserted {
            Ok(()) => Ok(vec![Outcome::Delivered; rows.len()]),
            Err(Failure::Transient(error)) => Err(error),
            Err(Failure::Row(refusal)) => {
                tracing::debug!(sink = %self.name, error = %refusal.summary, "A row was refused; inserting the batch row by row.");
                self.insert_row_by_row(conn, rows).await
            }
        }
    }

    /// The exactly-once path, in one transaction: the rows copied into the temporary table,
    /// then inserted into the landing table unless their idempotency key is there already.
    async fn deliver_exactly_once(
        &self,
        conn: &mut Connection,
        rows: &[LandingRow<'_>],
    ) -> Result<(), Failure> {
        let tx = conn
            .client
            .transaction()
            .await
            .map_err(|err| self.failure(err))?;
        match self.insert_through_incoming(&tx, rows, false).await {
            Ok(_) => tx.commit().await.map_err(|err| self.failure(err)),
            Err(failure) => {
                self.roll_back(tx, &failure).await?;
                Err(failure)
            }
        }
    }

    /// Copies `rows` into the connection's temporary table (creating it when missing) and
    /// inserts the new ones into the landing table, in sequence order; with `returning`, says
    /// which idempotency keys it added.
    async fn insert_through_incoming(
        &self,
        tx: &Transaction<'_>,
        rows: &[LandingRow<'_>],
        returning: bool,
    ) -> Result<HashSet<String>, Failure> {
        let fail = |err| self.failure(err);
        if self.transaction_pooling {
            // No COPY behind a pooler (deliver_inserted); the insert skips the rows already there.
            let insert = if returning {
                INSERT_RETURNING_SQL
            } else {
                super::INSERT_SQL
            };
            let added = self.insert_many(tx, insert, rows).await?;
            return Ok(added.iter().map(|row| row.get(0)).collect());
        }
        tx.batch_execute(INCOMING_TABLE_SQL).await.map_err(fail)?;
        let sink = tx.copy_in(COPY_INCOMING_SQL).await.map_err(fail)?;
        write_rows(sink, &self.agent_id, rows)
            .await
            .map_err(|err| match err {
                CopyError::Server(err) => fail(err),
                CopyError::Encode { seq, error } => Failure::Row(Refusal::new(
                    format!("record {seq} cannot be encoded for its landing row"),
                    &error,
                )),
            })?;
        if returning {
            let added = tx
                .query(INSERT_FROM_INCOMING_RETURNING_SQL, &[])
                .await
                .map_err(fail)?;
            Ok(added.iter().map(|row| row.get(0)).collect())
        } else {
            tx.execute(INSERT_FROM_INCOMING_SQL, &[])
                .await
                .map_err(fail)?;
            Ok(HashSet::new())
        }
    }

    /// Ends a transaction that met `failure`: a refused row rolls it back on the spot (the
    /// connection goes on row by row); a transient failure leaves it to the dropped connection.
    async fn roll_back(&self, tx: Transaction<'_>, failure: &Failure) -> Result<(), Failure> {
        if matches!(failure, Failure::Row(_)) {
            tx.rollback().await.map_err(|err| self.failure(err))?;
        }
        Ok(())
    }

    /// Apply mode: the batch in one transaction, the landing rows through the temporary table
    /// and the statements of the records the insert added, in sequence order; row by row when
    /// the database refuses a row or a statement.
    async fn deliver_applied(
        &self,
        conn: &mut Connection,
        rows: &[LandingRow<'_>],
    ) -> Result<Vec<Outcome>, String> {
        let transient = |err| self.failure(err).message();
        let tx = conn.client.transaction().await.map_err(transient)?;
        let mut prepared = Prepared::new();
        let result = async {
            let added = self.insert_through_incoming(&tx, rows, true).await?;
            let applies: Vec<&ApplyRow> = rows
                .iter()
                .filter(|row| added.contains(row.idempotency_key.as_ref()))
                .filter_map(|row| row.apply.as_ref())
                .collect();
            self.apply_pipelined(&tx, &applies, &mut prepared).await
        }
        .await;
        // Closed before the transaction ends, on the server connection they were prepared on
        // (behind a transaction pooler, the next transaction may run on another one).
        drop(prepared);
        match result {
            Ok(()) => {
                tx.commit().await.map_err(transient)?;
                Ok(vec![Outcome::Delivered; rows.len()])
            }
            Err(Failure::Transient(error)) => Err(error),
            Err(failure @ Failure::Row(_)) => {
                self.roll_back(tx, &failure)
                    .await
                    .map_err(Failure::message)?;
                tracing::debug!(sink = %self.name, error = %failure.message(), "A row or apply statement was refused; delivering the batch row by row.");
                self.insert_row_by_row(conn, rows).await
            }
        }
    }

    /// Apply mode, one row: its landing row and, when the insert added it (not a replay), its
    /// statement.
    async fn insert_and_apply(
        &self,
        tx: &impl GenericClient,
        row: &LandingRow<'_>,
        prepared: &mut Prepared,
    ) -> Result<(), Failure> {
        let added = !self
            .insert_one(tx, INSERT_RETURNING_SQL, row)
            .await?
            .is_empty();
        match &row.apply {
            Some(apply) if added => self.apply(tx, apply, prepared).await,
            _ => Ok(()),
        }
    }

    /// Runs the apply statements of a batch, in sequence order, pipelined: each statement is
    /// prepared once, then every execution is sent before the first answer is awaited
    /// (tokio-postgres sends a request when its future is first polled, and [`join_in_order`]
    /// polls them in order), so the server runs them in that order with no round trip between
    /// them — over a WAN, one round trip per batch instead of one per record. The first error
    /// in order is the one that counts: after it the transaction is aborted and the later
    /// statements fail with 25P02, which says nothing about their records.
    async fn apply_pipelined(
        &self,
        tx: &Transaction<'_>,
        applies: &[&ApplyRow],
        prepared: &mut Prepared,
    ) -> Result<(), Failure> {
        let mut statements = Vec::with_capacity(applies.len());
        for apply in applies {
            statements.push(self.prepare_apply(tx, apply, prepared).await?);
        }
        let values: Vec<Vec<Option<String>>> = applies
            .iter()
            .map(|apply| apply.values.iter().map(Bound::as_pg_text).collect())
            .collect();
        let params: Vec<Vec<&(dyn ToSql + Sync)>> = values
            .iter()
            .map(|row| row.iter().map(|v| v as &(dyn ToSql + Sync)).collect())
            .collect();
        let executions = statements
            .iter()
            .zip(&params)
            .map(|(statement, params)| tx.execute(statement, params))
            .collect();
        for (apply, result) in applies.iter().zip(join_in_order(executions).await) {
            result.map_err(|err| self.failure(err).map(|m| apply.context(m)))?;
        }
        Ok(())
    }

    /// The prepared statement of `apply`'s file, prepared on this connection when first used in
    /// the batch, with every parameter typed `text`.
    async fn prepare_apply(
        &self,
        tx: &impl GenericClient,
        apply: &ApplyRow,
        prepared: &mut Prepared,
    ) -> Result<Statement, Failure> {
        let file = &apply.statement.file;
        if let Some(statement) = prepared.get(file) {
            return Ok(statement.clone());
        }
        let types = vec![Type::TEXT; apply.statement.params.len()];
        let statement = tx
            .prepare_typed(&apply.statement.sql, &types)
            .await
            .map_err(|err| self.failure(err).map(|m| apply.context(m)))?;
        prepared.insert(file.clone(), statement.clone());
        Ok(statement)
    }

    /// Runs one record's apply statement, every parameter bound as text.
    async fn apply(
        &self,
        tx: &impl GenericClient,
        apply: &ApplyRow,
        prepared: &mut Prepared,
    ) -> Result<(), Failure> {
        let in_file = |failure: Failure| failure.map(|m| apply.context(m));
        let statement = self.prepare_apply(tx, apply, prepared).await?;
        let values: Vec<Option<String>> = apply.values.iter().map(Bound::as_pg_text).collect();
        let params: Vec<&(dyn ToSql + Sync)> =
            values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        tx.execute(&statement, &params)
            .await
            .map(|_| ())
            .map_err(|err| in_file(self.failure(err)))
    }

    /// Inserts one row with `insert` (`sql/postgres/insert_records*.sql`, arrays of one
    /// element); the rows it returned (the idempotency key when it added the row and the
    /// statement returns it).
    async fn insert_one<T>(
        &self,
        tx: &impl GenericClient,
        insert: &T,
        row: &LandingRow<'_>,
    ) -> Result<Vec<tokio_postgres::Row>, Failure>
    where
        T: ?Sized + tokio_postgres::ToStatement + Sync + Send,
    {
        self.insert_many(tx, insert, std::slice::from_ref(row))
            .await
    }

    /// Inserts `rows`, in their order, with `insert` (`sql/postgres/insert_records*.sql`, one
    /// array per column); the rows it returned.
    async fn insert_many<T>(
        &self,
        tx: &impl GenericClient,
        insert: &T,
        rows: &[LandingRow<'_>],
    ) -> Result<Vec<tokio_postgres::Row>, Failure>
    where
        T: ?Sized + tokio_postgres::ToStatement + Sync + Send,
    {
        let keys: Vec<&str> = rows.iter().map(|r| r.idempotency_key.as_ref()).collect();
        let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        let actions: Vec<&str> = rows.iter().map(|r| r.action.as_ref()).collect();
        let entities: Vec<&str> = rows.iter().map(|r| r.entity.as_ref()).collect();
        let record_keys: Vec<Option<&str>> = rows.iter().map(|r| r.record_key.as_deref()).collect();
        let payloads: Vec<&str> = rows.iter().map(|r| r.payload.as_ref()).collect();
        let staged: Vec<chrono::DateTime<chrono::Utc>> = rows.iter().map(|r| r.staged_at).collect();
        let agents: Vec<&str> = rows.iter().map(|r| r.agent_id(&self.agent_id)).collect();
        let params: [&(dyn ToSql + Sync); 8] = [
            &agents,
            &keys,
            &seqs,
            &actions,
            &entities,
            &record_keys,
            &payloads,
            &staged,
        ];
        tx.query(insert, &params)
            .await
            .map_err(|err| self.failure(err))
    }

    /// One transaction, one savepoint per row, in sequence order: a refused row is dead and the
    /// later rows of its key are skipped (not inserted), the rest delivered.
    async fn insert_row_by_row(
        &self,
        conn: &mut Connection,
        rows: &[LandingRow<'_>],
    ) -> Result<Vec<Outcome>, String> {
        let transient = |err| self.failure(err).message();
        let mut tx = conn.client.transaction().await.map_err(transient)?;
        // Behind a transaction pooler, prepared in this transaction (and closed before its end).
        let insert = match &conn.insert {
            Some(insert) => insert.clone(),
            None => tx
                .prepare(super::INSERT_SQL)
                .await
                .map_err(|err| self.failure(err).message())?,
        };
        let mut outcomes = Vec::with_capacity(rows.len());
        let mut prepared = Prepared::new();
        let mut stopped = Stopped::default();
        for row in rows {
            if stopped.holds(row) {
                outcomes.push(Outcome::Skipped);
                continue;
            }
            let savepoint = tx.savepoint("estafeta_row").await.map_err(transient)?;
            let result = if self.apply.is_some() {
                self.insert_and_apply(&savepoint, row, &mut prepared).await
            } else {
                self.insert_one(&savepoint, &insert, row).await.map(|_| ())
            };
            match result {
                Ok(()) => {
                    savepoint.commit().await.map_err(transient)?;
                    outcomes.push(Outcome::Delivered);
                }
                Err(Failure::Row(reason)) => {
                    savepoint.rollback().await.map_err(transient)?;
                    stopped.stop(row);
                    outcomes.push(Outcome::Dead { reason });
                }
                Err(Failure::Transient(error)) => return Err(error),
            }
        }
        // Closed inside the transaction (see deliver_applied).
        drop((insert, prepared));
        tx.commit().await.map_err(transient)?;
        Ok(outcomes)
    }
}

/// Polls `futures` together until all are done, each first in the order given; their outputs
/// in that order. After the first round, polling starts at the first unfinished future: the
/// answers of a pipeline come in order.
async fn join_in_order<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    let mut unfinished = 0;
    std::future::poll_fn(|cx| {
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()).skip(unfinished) {
            if output.is_none()
                && let Poll::Ready(value) = future.as_mut().poll(cx)
            {
                *output = Some(value);
            }
        }
        while outputs.get(unfinished).is_some_and(Option::is_some) {
            unfinished += 1;
        }
        if unfinished == outputs.len() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    outputs
        .into_iter()
        .map(|output| output.expect("poll_fn returned only once every future was done"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn join_in_order_gives_every_output_in_the_order_given() {
        let futures: Vec<_> = [30u64, 0, 20, 10]
            .into_iter()
            .map(|ms| async move {
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                ms
            })
            .collect();
        assert_eq!(join_in_order(futures).await, [30, 0, 20, 10]);
        assert!(
            join_in_order(Vec::<std::future::Ready<u8>>::new())
                .await
                .is_empty()
        );
    }
}
