-- Seed 000, every 10 s: the users created or changed in AGHU since the last cycle. The
-- checkpoint is (alterado_em, id): the change time, and the row id to break ties between
-- changes in the same instant. The first run reads every user (an initial load), a page at a
-- time. The alias "lotacao.setor" nests the sector as the apply statement expects.
SELECT id, alterado_em, matricula, nome, cpf, email, setor AS "lotacao.setor", ativo, fim_vinculo
  FROM aghu_usuario
 WHERE :last_alterado_em::timestamptz IS NULL
    OR (alterado_em, id) > (:last_alterado_em::timestamptz, :last_id::bigint)
 ORDER BY alterado_em, id
 LIMIT :limit
