"""fluxmq.node"""
