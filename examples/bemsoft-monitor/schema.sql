-- The shape of the Bemsoft monitor's source (seed 003): exam items (ItemSol) of a request
-- (solicitacao) for a patient (paciente). Written for PostgreSQL, with the SQL Server
-- column names in lower case. The e2e test creates it in a throwaway schema.
CREATE TABLE paciente (
    cod_paciente    INTEGER PRIMARY KEY,
    nome            TEXT NOT NULL,
    cpf             VARCHAR(11),
    data_nascimento DATE,
    sexo            CHAR(1)
);
CREATE TABLE solicitacao (
    cod_solicitacao INTEGER PRIMARY KEY,
    cod_paciente    INTEGER NOT NULL REFERENCES paciente,
    dtaentrada      DATE NOT NULL,
    hora            TIME NOT NULL
);
CREATE TABLE item_sol (
    cod_item_sol      BIGSERIAL PRIMARY KEY,       -- the checkpoint (seed 003's LastItemId)
    cod_solicitacao   INTEGER NOT NULL REFERENCES solicitacao,
    cod_exame         VARCHAR(20) NOT NULL,
    material          VARCHAR(60),
    nome_terceirizado VARCHAR(60) NOT NULL,        -- seed 003's TERCEIRO filter
    data_entrada      TIMESTAMPTZ NOT NULL DEFAULT now()
);
