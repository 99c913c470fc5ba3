"""Money and metering: plans, accounts and keys, admission (Redis), the usage meter and the
SQL ledger. Money is an integer count of nano-dollars (nUSD, 1e-9 USD) everywhere."""
