"""What the tests share besides fixtures: real servers on 127.0.0.1 (`servers`), AWS's rules that
moto does not enforce (`aws_rules`), the browser (`browser`), CloudFormation's replacement rules
(`replacement`), a project folder (`projects`) and a moto account (`accounts`). Imported as
`support.<module>`; conftest.py holds only fixtures."""
