"""What the tests share: small real inputs built at run time (`search_fixtures`, `user_data`), where the shared data
is (`shared_data`), and a reader of offline W&B runs (`wandb_records`)."""
