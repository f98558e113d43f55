-- Attendances changed since the last cycle (seed 004's "Carga"). The checkpoint is the pair
-- (atualizado_em, id_atendimento): the time an attendance changed, and its id to break ties
-- between rows changed in the same instant. On the first run both are NULL: the whole history
-- is read, :limit rows (max_records, seed 004's MaxRecords) per page, each page committed with
-- its checkpoint before the next, so a crash resumes where it stopped. Then, incremental.
SELECT id_atendimento,
       atualizado_em,
       id_paciente     AS "paciente.id",
       nome_paciente   AS "paciente.nome",
       tipo,
       cid,
       valor
  FROM atendimento
 WHERE :last_atualizado_em::timestamptz IS NULL
    OR (atualizado_em, id_atendimento) > (:last_atualizado_em::timestamptz, :last_id_atendimento::bigint)
 ORDER BY atualizado_em, id_atendimento
 LIMIT :limit
