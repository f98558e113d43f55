-- The shape of the Fusion "Carga" source (seed 004): attendances updated in the hospital
-- system, with the patient. Written for PostgreSQL; the e2e test creates it in a throwaway
-- schema.
CREATE TABLE atendimento (
    id_atendimento  BIGINT PRIMARY KEY,
    id_paciente     BIGINT NOT NULL,
    nome_paciente   TEXT NOT NULL,
    tipo            VARCHAR(20) NOT NULL,       -- AMBULATORIAL, INTERNACAO, URGENCIA
    cid             VARCHAR(10),
    valor           NUMERIC(12,2),
    atualizado_em   TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX atendimento_atualizado ON atendimento (atualizado_em, id_atendimento);
