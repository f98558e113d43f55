-- Seed 000's "liberar licenças": a user with no recent activity is deactivated in Invenzi.
-- The record carries only the matricula.
UPDATE invenzi_usuario
   SET ativo = FALSE,
       aplicacoes = aplicacoes + 1,
       atualizado_em = CURRENT_TIMESTAMP(6)
 WHERE matricula = :matricula;
