-- Seed 000, every 10 s: "verifica se o usuário existe e atualiza, se positivo; cadastra o
-- usuário, caso contrário". One statement does both. Each :name is a field of the record's
-- payload (:lotacao.setor is the field setor inside lotacao). JSON true/false bind as 1/0 and
-- "2027-12-31" converts to DATE. VALUES(col) is the inserted value (MariaDB and MySQL alike).
INSERT INTO invenzi_usuario (matricula, nome, cpf, email, setor, ativo, fim_vinculo)
VALUES (:matricula, :nome, :cpf, :email, :lotacao.setor, :ativo, :fim_vinculo)
ON DUPLICATE KEY UPDATE
    -- A user AGHU reactivates gets a new licence period ("liberar licenças" counts from here).
    -- First in the list: MariaDB evaluates the assignments in order, and `ativo` below changes.
    ativado_em    = IF(VALUES(ativo) AND NOT ativo, CURRENT_TIMESTAMP(6), ativado_em),
    nome          = VALUES(nome),
    cpf           = VALUES(cpf),
    email         = VALUES(email),
    setor         = VALUES(setor),
    ativo         = VALUES(ativo),
    fim_vinculo   = VALUES(fim_vinculo),
    aplicacoes    = aplicacoes + 1,
    atualizado_em = CURRENT_TIMESTAMP(6);
