-- The target of seed 000's user sync, as a MariaDB / MySQL table: Invenzi's user register, one
-- row per AGHU user (matricula). A DBA creates it once; Estafeta never runs DDL on target tables.
-- `aplicacoes` counts how many records were applied to the row (1 when created, +1 per update
-- or deactivation): a replayed record that was applied twice would show here.
CREATE TABLE IF NOT EXISTS invenzi_usuario (
    id            BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    matricula     VARCHAR(20)     NOT NULL,
    nome          VARCHAR(200)    NOT NULL,
    cpf           VARCHAR(11)     NOT NULL,
    email         VARCHAR(200)    NULL,
    setor         VARCHAR(100)    NULL,
    ativo         BOOLEAN         NOT NULL,
    fim_vinculo   DATE            NULL,
    aplicacoes    INT             NOT NULL DEFAULT 1,
    ultimo_transito DATETIME(6)   NULL,             -- last turnstile passage (Invenzi sets it)
    ativado_em    DATETIME(6)     NOT NULL DEFAULT CURRENT_TIMESTAMP(6), -- created, or last reactivated
    atualizado_em DATETIME(6)     NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    UNIQUE KEY invenzi_usuario_matricula (matricula)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
