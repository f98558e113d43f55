-- Run on every new connection. Strict mode, so a value that does not fit is an error (and a
-- dead letter with the reason) instead of being silently cut; UTC, so DATETIME columns and
-- CURRENT_TIMESTAMP hold UTC whatever the server's zone.
SET SESSION sql_mode = 'STRICT_ALL_TABLES,NO_ZERO_IN_DATE,NO_ZERO_DATE,ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION';
SET SESSION time_zone = '+00:00';
SET NAMES utf8mb4;
