-- Seed 000's "liberar licenças" for an Invenzi database on MariaDB / MySQL: the same rule as
-- ../postgres/liberar-licencas.sql (see there). Parameters are plain :names (no ::casts, which
-- MariaDB does not know); `estafeta check-config` prepares this query on the database.
SELECT liberar_em, matricula
  FROM (SELECT matricula,
               GREATEST(COALESCE(ultimo_transito, ativado_em), ativado_em)
                 + INTERVAL :dias_sem_transito DAY AS liberar_em
          FROM invenzi_usuario
         WHERE ativo) AS u
 WHERE liberar_em < CURRENT_TIMESTAMP(6)
   AND (:last_liberar_em IS NULL
        OR (liberar_em, matricula) > (:last_liberar_em, :last_matricula))
 ORDER BY liberar_em, matricula
 LIMIT :limit
