"""Generation engines behind one interface (`gateway.engines.base.Engine`)."""
