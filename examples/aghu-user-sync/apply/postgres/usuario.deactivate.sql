-- Seed 000's "liberar licenças": a user with no recent activity is deactivated in Invenzi.
-- The record carries only the matricula.
UPDATE invenzi_usuario
   SET ativo = false,
       aplicacoes = aplicacoes + 1,
       atualizado_em = now()
 WHERE matricula = :matricula;
