-- Seed 000, daily: the patients scheduled for today are activated in Invenzi (an upsert with
-- ativo = true). The checkpoint is the schedule row's id, so a patient added to today's
-- schedule later in the day is picked up at the next run, and none twice.
SELECT id, matricula, nome, cpf, NULL AS email, 'Paciente' AS "lotacao.setor",
       true AS ativo, dia AS fim_vinculo
  FROM aghu_agenda
 WHERE dia = current_date
   AND (:last_id::bigint IS NULL OR id > :last_id)
 ORDER BY id
 LIMIT :limit
