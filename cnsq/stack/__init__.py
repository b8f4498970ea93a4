"""What cnsq knows of a deployed stack: its logical ids and output keys (`logical_ids`), where
its queue, database, model and cluster are (`deployed`), its admin function (`admin`) and the
database credentials it keeps (`credentials`). Read by every command that operates a stack."""
