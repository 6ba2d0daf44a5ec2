"""One resource module per API area; each only translates HTTP to engine facade calls."""
