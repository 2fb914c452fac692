// A Spring for Apache Kafka client of the server: ReplyingKafkaTemplate sends each JSON-RPC
// request read from stdin (one per line) to the server's input topic, keyed by the session,
// and prints the correlated reply as "PARTITION VALUE", or "ERROR reason".  With a partition
// its reply container reads that one partition of the reply topic (manual assignment), so the
// template names it in the request's kafka_replyPartition header; without, it joins a group.
//
//   java -cp 'libs/*:classes' ReplyingClient BOOTSTRAP REQUEST_TOPIC REPLY_TOPIC SESSION [PARTITION]

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.time.Duration;
import java.util.HashMap;
import java.util.Map;
import java.util.UUID;
import java.util.concurrent.TimeUnit;

import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.apache.kafka.common.serialization.StringSerializer;
import org.springframework.kafka.core.DefaultKafkaConsumerFactory;
import org.springframework.kafka.core.DefaultKafkaProducerFactory;
import org.springframework.kafka.listener.ContainerProperties;
import org.springframework.kafka.listener.KafkaMessageListenerContainer;
import org.springframework.kafka.requestreply.ReplyingKafkaTemplate;
import org.springframework.kafka.requestreply.RequestReplyFuture;
import org.springframework.kafka.support.TopicPartitionOffset;

public class ReplyingClient {
    public static void main(String[] args) throws Exception {
        String bootstrap = args[0], requests = args[1], replies = args[2], session = args[3];
        Integer partition = args.length > 4 ? Integer.valueOf(args[4]) : null;

        Map<String, Object> producer = new HashMap<>();
        producer.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        producer.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class);
        producer.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, StringSerializer.class);
        Map<String, Object> consumer = new HashMap<>();
        consumer.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        consumer.put(ConsumerConfig.GROUP_ID_CONFIG, "spring-replies-" + UUID.randomUUID());
        consumer.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class);
        consumer.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class);
        consumer.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "latest");
        // The tests' short group sessions (Tansu holds a join for half the session timeout).
        consumer.put(ConsumerConfig.SESSION_TIMEOUT_MS_CONFIG, 6000);
        consumer.put(ConsumerConfig.HEARTBEAT_INTERVAL_MS_CONFIG, 500);

        ContainerProperties properties = partition == null ? new ContainerProperties(replies)
            : new ContainerProperties(new TopicPartitionOffset(replies, partition));
        KafkaMessageListenerContainer<String, String> container =
            new KafkaMessageListenerContainer<>(new DefaultKafkaConsumerFactory<>(consumer), properties);
        DefaultKafkaProducerFactory<String, String> factory = new DefaultKafkaProducerFactory<>(producer);
        ReplyingKafkaTemplate<String, String, String> template =
            new ReplyingKafkaTemplate<>(factory, container);
        template.setDefaultReplyTimeout(Duration.ofSeconds(30));
        template.start();
        try {
            if (!template.waitForAssignment(Duration.ofSeconds(60))) {
                System.out.println("ERROR the reply container got no partition within 60 s");
                System.exit(1);
            }
            System.out.println("READY");
            System.out.flush();
            BufferedReader in = new BufferedReader(new InputStreamReader(System.in, "UTF-8"));
            for (String line = in.readLine(); line != null; line = in.readLine()) {
                RequestReplyFuture<String, String, String> future =
                    template.sendAndReceive(new ProducerRecord<>(requests, session, line));
                try {
                    ConsumerRecord<String, String> reply = future.get(40, TimeUnit.SECONDS);
                    System.out.println(reply.partition() + " " + reply.value());
                } catch (Exception exc) {
                    System.out.println("ERROR " + exc);
                }
                System.out.flush();
            }
        } finally {
            template.stop();
            factory.destroy();
        }
        System.exit(0);  // (the container's threads are not all daemons)
    }
}
