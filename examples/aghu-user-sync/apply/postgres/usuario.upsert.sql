-- Seed 000, every 10 s: "verifica se o usuário existe e atualiza, se positivo; cadastra o
-- usuário, caso contrário". One statement does both. Each :name is a field of the record's
-- payload (:lotacao.setor is the field setor inside lotacao); every parameter reaches
-- PostgreSQL as text, so non-text columns get a cast.
INSERT INTO invenzi_usuario (matricula, nome, cpf, email, setor, ativo, fim_vinculo)
VALUES (:matricula, :nome, :cpf, :email, :lotacao.setor, :ativo::boolean, :fim_vinculo::date)
ON CONFLICT (matricula) DO UPDATE SET
    -- A user AGHU reactivates gets a new licence period ("liberar licenças" counts from here).
    ativado_em    = CASE WHEN EXCLUDED.ativo AND NOT invenzi_usuario.ativo
                         THEN now() ELSE invenzi_usuario.ativado_em END,
    nome          = EXCLUDED.nome,
    cpf           = EXCLUDED.cpf,
    email         = EXCLUDED.email,
    setor         = EXCLUDED.setor,
    ativo         = EXCLUDED.ativo,
    fim_vinculo   = EXCLUDED.fim_vinculo,
    aplicacoes    = invenzi_usuario.aplicacoes + 1,
    atualizado_em = now();
