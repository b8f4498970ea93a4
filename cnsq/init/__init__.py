"""`cnsq init`: a starter project written from the shipped files, and the guided questions
(`guided`) that fill its config."""
