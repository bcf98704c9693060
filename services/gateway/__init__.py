"""The gateway: the public port. InvokeSkill, plus the registry and deployer APIs forwarded after auth."""
