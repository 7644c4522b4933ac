"""fluxmq.broker"""
