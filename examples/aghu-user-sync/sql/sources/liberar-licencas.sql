-- Seed 000's "liberar licenças": Invenzi users whose last passage through a turnstile is more
-- than 30 days old are deactivated. The checkpoint is (ultimo_transito, matricula): a user is
-- read once when its last passage crosses the 30-day line; one who passes again later crosses
-- it again later and is read again then. Reads Invenzi's own table, so this source's URL is
-- the Invenzi database.
SELECT ultimo_transito, matricula
  FROM invenzi_usuario
 WHERE ativo
   AND ultimo_transito < now() - interval '30 days'
   AND (:last_ultimo_transito::timestamptz IS NULL
        OR (ultimo_transito, matricula) > (:last_ultimo_transito::timestamptz, :last_matricula::text))
 ORDER BY ultimo_transito, matricula
 LIMIT :limit
