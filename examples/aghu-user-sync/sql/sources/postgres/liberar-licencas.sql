-- Seed 000's "liberar licenças": an active Invenzi user with no turnstile passage for
-- :dias_sem_transito days (30 in estafeta.toml) is deactivated. The clock starts at the last
-- passage or at the user's (re)activation, whichever is later, so a user who never passed is
-- released 30 days after activation, and one AGHU reactivates gets 30 new days.
--
-- The checkpoint is (liberar_em, matricula): the moment the user became releasable. It only
-- moves forward, and an event that makes a user releasable again (a new passage, a
-- reactivation) gives a later liberar_em, past the checkpoint, so that user is read again when
-- the moment comes. Reads Invenzi's own table, so this source's URL is the Invenzi database.
SELECT liberar_em, matricula
  FROM (SELECT matricula,
               greatest(coalesce(ultimo_transito, ativado_em), ativado_em)
                 + make_interval(days => :dias_sem_transito::int) AS liberar_em
          FROM invenzi_usuario
         WHERE ativo) AS u
 WHERE liberar_em < now()
   AND (:last_liberar_em::timestamptz IS NULL
        OR (liberar_em, matricula) > (:last_liberar_em::timestamptz, :last_matricula::text))
 ORDER BY liberar_em, matricula
 LIMIT :limit
