-- New exam items for the lab partner since the last cycle, oldest first (seed 003's monitor).
-- :last_cod_item_sol is the checkpoint (NULL on the first run: read everything), :limit is
-- max_records. One row per item; the source groups them by request (group_by = "request"):
-- the columns aliased "itens.*" become the request's array, the others are taken once.
SELECT i.cod_item_sol,
       s.cod_solicitacao                 AS request,
       s.dtaentrada                      AS "entrada.data",
       s.hora                            AS "entrada.hora",
       p.cod_paciente                    AS "paciente.codigo",
       p.nome                            AS "paciente.nome",
       p.cpf                             AS "paciente.cpf",
       p.data_nascimento                 AS "paciente.nascimento",
       p.sexo                            AS "paciente.sexo",
       i.cod_item_sol                    AS "itens.codigo",
       i.cod_exame                       AS "itens.exame",
       i.material                        AS "itens.material",
       i.data_entrada
  FROM item_sol i
  JOIN solicitacao s ON s.cod_solicitacao = i.cod_solicitacao
  JOIN paciente p ON p.cod_paciente = s.cod_paciente
 WHERE i.nome_terceirizado = 'BEMSOFT'
   AND (:last_cod_item_sol::bigint IS NULL OR i.cod_item_sol > :last_cod_item_sol)
 ORDER BY i.cod_item_sol
 LIMIT :limit
