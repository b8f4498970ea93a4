"""Deploying a stack: the template rendered from the config (`template`), each Lambda's zip
(`package`), what AWS must allow and hold first (`preflight`), what a deployed stack keeps
(`adopt`), the change set planned (`plan`) and applied (`apply`), and every CloudFormation and
S3 call of a deploy (`cloudformation`)."""
