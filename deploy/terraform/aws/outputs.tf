output "endpoint" {
  description = "Devices connect to mqtts://<endpoint>:8883, staff to https://<endpoint>/."
  value       = aws_lb.main.dns_name
}

output "lake_bucket" {
  value = aws_s3_bucket.lake.bucket
}

output "database_address" {
  value = aws_db_instance.main.address
}
