"""splitspec target server: the front door; verifies draft blocks with the target model."""
